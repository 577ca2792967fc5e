"""Datasets for the GSM experiments, read through TensorFlow Datasets (TFDS).

Supported: ``mnist``, ``fashion_mnist``, ``cifar10`` and ``imagenet2012``.

Preparation (:func:`prepare`)
  A dataset is built into ``data_dir`` (default ``$OPTAX_GSM_DATA_DIR`` or
  ``~/.cache/optax_gsm/tensorflow_datasets``) once, preferably *offline* from a
  ``manual_dir`` that holds the original files (by default
  ``<repo>/../shared/datasets/<name>`` when that folder exists, otherwise the normal
  TFDS download is tried).  Two safeguards make it impossible to build one dataset
  from another dataset's files:

  * every dataset gets its own TFDS download directory,
    ``<data_dir>/downloads/<name>``.  TFDS caches *extracted* archives by file name
    under ``<download_dir>/extracted``; MNIST and Fashion-MNIST ship files with
    identical names, so with the shared default download directory preparing
    Fashion-MNIST after MNIST silently re-used the MNIST images;
  * the files of a manual directory are checked against the official sha256
    digests hard-coded in :data:`DATASETS` before TFDS sees them, and a folder of
    the wrong dataset is rejected with an error that names the dataset the files
    actually belong to.

  Every MNIST/Fashion-MNIST split that is loaded, whole or a subset of any
  size, train or test, is checked against the dataset's fingerprint: the
  sha256 of its first examples in TFDS's (deterministic) order
  (:func:`check_identity`), and a full training split's mean pixel value is
  compared with the dataset's known mean.  This also catches a ``data_dir``
  poisoned by the pitfall above before these safeguards existed, and names
  the dataset it really holds.

Input pipelines (:func:`load`)
  MNIST, Fashion-MNIST and CIFAR-10 are small, so a split is decoded into a numpy
  array once and batches are cut from memory (:class:`InMemoryPipeline`); CIFAR
  augmentation (4-pixel zero padding + random 32x32 crop + horizontal flip) is
  vectorised numpy.  ImageNet streams through ``tf.data`` with JPEG decode-and-crop
  fused (:class:`ImageNetPipeline`).

  Every random choice of epoch ``e`` (example order, crops, flips) is a pure
  function of ``(seed, e)``, so a run resumed at epoch ``e`` sees exactly the batches
  an uninterrupted run would have seen.  :func:`measure_throughput` reports the
  images/second a pipeline delivers on its own.

Batches are :class:`Batch` tuples of float32 NHWC images normalised per channel,
int32 labels and a float32 mask (0 marks padding in the last evaluation batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

DATA_DIR_ENV = "OPTAX_GSM_DATA_DIR"


class ManualFile(NamedTuple):
  """A file TFDS expects in the manual directory, with its official size and digest."""

  name: str
  size: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a supported dataset.

  Attributes:
    name: our name (the key of :data:`DATASETS`).
    tfds_name: TFDS builder name.
    train_split / eval_split: TFDS split names used for training / evaluation.
    num_classes: number of labels.
    image_shape: ``(H, W, C)`` of the stored images, ``None`` when variable.
    mean, std: per-channel normalisation constants on the [0, 1] pixel scale.
    manual_files: files of the manual directory with official sizes and sha256
      (the digests TFDS registers in its ``url_checksums``).
    in_memory: whether :func:`load` decodes the split into numpy once.
    expected_train_mean: mean pixel value ([0, 1] scale) of the full training
      split, checked after loading it; ``None`` disables the check.
    augment: training augmentation: ``"none"``, ``"cifar"`` or ``"imagenet"``.
    fingerprints: ``(TFDS split, digests)`` pairs: :func:`example_digest` of
      the split's first examples in TFDS's order (tensorflow-datasets 4.9,
      dataset version 3.0.1); empty disables the identity check.
  """

  name: str
  tfds_name: str
  train_split: str
  eval_split: str
  num_classes: int
  image_shape: tuple[int, int, int] | None
  mean: tuple[float, ...]
  std: tuple[float, ...]
  manual_files: tuple[ManualFile, ...]
  in_memory: bool
  expected_train_mean: float | None
  augment: str
  fingerprints: tuple[tuple[str, tuple[str, ...]], ...] = ()


DATASETS: dict[str, DatasetSpec] = {
  "mnist": DatasetSpec(
    name="mnist",
    tfds_name="mnist",
    train_split="train",
    eval_split="test",
    num_classes=10,
    image_shape=(28, 28, 1),
    mean=(0.1307,),
    std=(0.3081,),
    manual_files=(
      ManualFile(
        "train-images-idx3-ubyte.gz",
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
      ),
      ManualFile(
        "train-labels-idx1-ubyte.gz",
        28881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
      ),
      ManualFile(
        "t10k-images-idx3-ubyte.gz",
        1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
      ),
      ManualFile(
        "t10k-labels-idx1-ubyte.gz",
        4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
      ),
    ),
    in_memory=True,
    expected_train_mean=0.1307,
    augment="none",
    fingerprints=(
      (
        "train",
        (
          "28336adf60f788cc",
          "fa75f360f6eb34f3",
          "a06c28094037ed0e",
          "17c97bca985b367c",
          "a305584f267b53a2",
          "8eea46ee3d63f638",
          "8bc86212ac3ca1d3",
          "e27c6883e6af4a01",
        ),
      ),
      (
        "test",
        (
          "262a40b69bc3a2ee",
          "60194f34c28d94b3",
          "002dd660c6a3da16",
          "6502e3950731a238",
          "ac88df7e249689d9",
          "e96cc2b0832bf4d4",
          "e41dbb5206effcfe",
          "33e4b2bb43d459d8",
        ),
      ),
    ),
  ),
  "fashion_mnist": DatasetSpec(
    name="fashion_mnist",
    tfds_name="fashion_mnist",
    train_split="train",
    eval_split="test",
    num_classes=10,
    image_shape=(28, 28, 1),
    mean=(0.2860,),
    std=(0.3530,),
    manual_files=(
      ManualFile(
        "train-images-idx3-ubyte.gz",
        26421880,
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
      ),
      ManualFile(
        "train-labels-idx1-ubyte.gz",
        29515,
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
      ),
      ManualFile(
        "t10k-images-idx3-ubyte.gz",
        4422102,
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
      ),
      ManualFile(
        "t10k-labels-idx1-ubyte.gz",
        5148,
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
      ),
    ),
    in_memory=True,
    expected_train_mean=0.2860,
    augment="none",
    fingerprints=(
      (
        "train",
        (
          "abcd5dd88dd01993",
          "ff10e9f89b823fa8",
          "938ee13c43fed329",
          "dc84fe5ebcca35d9",
          "47354d98c6a8826b",
          "04b2d9815e332b0e",
          "bf33fc5387cbe99b",
          "3c8bb661b22a96d6",
        ),
      ),
      (
        "test",
        (
          "55cf201bdba8d350",
          "f3f03b176de91cc0",
          "de92eae5731e6c61",
          "b42d6dcfefc964ba",
          "fdf6f83f9001da64",
          "e089ffbfd11d591b",
          "9a8cbacaeb752537",
          "1d70861d5dcbf8ab",
        ),
      ),
    ),
  ),
  "cifar10": DatasetSpec(
    name="cifar10",
    tfds_name="cifar10",
    train_split="train",
    eval_split="test",
    num_classes=10,
    image_shape=(32, 32, 3),
    # Exact per-channel statistics of the CIFAR-10 training set.
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    manual_files=(
      ManualFile(
        "cifar-10-binary.tar.gz",
        170052171,
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
      ),
    ),
    in_memory=True,
    expected_train_mean=None,
    augment="cifar",
  ),
  "imagenet2012": DatasetSpec(
    name="imagenet2012",
    tfds_name="imagenet2012",
    train_split="train",
    eval_split="validation",
    num_classes=1000,
    image_shape=None,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    manual_files=(
      ManualFile(
        "ILSVRC2012_img_train.tar",
        147897477120,
        "b08200a27a8e34218a0e58fde36b0fe8f73bc377f4acea2d91602057c3ca45bb",
      ),
      ManualFile(
        "ILSVRC2012_img_val.tar",
        6744924160,
        "c7e06a6c0baccf06d8dbeb6577d71efff84673a5dbdd50633ab44f8ea0456ae0",
      ),
    ),
    in_memory=False,
    expected_train_mean=None,
    augment="imagenet",
  ),
}

# Files above this size are checked by size only: hashing the 148 GB ImageNet
# archive would take longer than preparing it (TFDS reads it anyway).
HASH_SIZE_LIMIT = 2 * 1024**3


class DatasetError(RuntimeError):
  """A dataset cannot be prepared or loaded; the message says how to fix it."""


class ManualDirError(DatasetError, ValueError):
  """The manual directory does not hold the official files of the dataset."""


def get_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` of ``name``, with a helpful error for unknown names."""
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(
      f"unknown dataset {name!r}; supported: {', '.join(sorted(DATASETS))}"
    ) from None


def example_digest(image: np.ndarray, label: Any) -> str:
  """First 16 hex digits of the sha256 of one example: uint8 image bytes + int64 label."""
  data = np.ascontiguousarray(image, np.uint8).tobytes() + np.int64(label).tobytes()
  return hashlib.sha256(data).hexdigest()[:16]


def check_identity(
  name: str, split: str, images: np.ndarray, labels: np.ndarray, where: Any
) -> None:
  """Checks that a loaded split (or its first examples) is dataset ``name``'s.

  Compares :func:`example_digest` of the first ``min(len(images), k)``
  examples with the ``k`` registered in ``DATASETS[name].fingerprints`` for
  the TFDS split ``split``; a subset ``split[:n]`` starts with the same
  examples, so this works for every subset size.  Nothing is checked for a
  split without a fingerprint.

  Raises:
    DatasetError: the examples differ; the message names the dataset they
      belong to when it is another known one.
  """
  spec = get_spec(name)
  want = dict(spec.fingerprints).get(split)
  if not want or not len(images):
    return
  k = min(len(images), len(want))
  got = tuple(example_digest(images[i], labels[i]) for i in range(k))
  if got == want[:k]:
    return
  owner = next(
    (
      other.name
      for other in DATASETS.values()
      if other.name != name and dict(other.fingerprints).get(split, ())[:k] == got
    ),
    None,
  )
  hint = (
    f"they are the first examples of {owner!r}: it was built from {owner}'s files"
    if owner
    else "they are not (it was built from other files, or by another TFDS version)"
  )
  raise DatasetError(
    f"the prepared {name!r} in {where} does not look like {name}: the first {k} examples of "
    f"its split {split!r} should have the digests {', '.join(want[:k])}, but {hint}. "
    f"Delete {where} and prepare it again."
  )


def default_data_dir() -> Path:
  """``$OPTAX_GSM_DATA_DIR`` or ``~/.cache/optax_gsm/tensorflow_datasets``."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return Path(env).expanduser()
  return Path.home() / ".cache" / "optax_gsm" / "tensorflow_datasets"


def default_manual_dir(name: str) -> Path | None:
  """``<repo>/../shared/datasets/<name>`` when it exists, else ``None``."""
  candidate = SHARED_DATASETS / name
  return candidate if candidate.is_dir() else None


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
  """Hex sha256 digest of a file, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_size):
      h.update(chunk)
  return h.hexdigest()


def _owner_of_digest(digest: str) -> str | None:
  """``"<dataset>/<file>"`` whose official digest is ``digest``, if any."""
  for spec in DATASETS.values():
    for f in spec.manual_files:
      if f.sha256 == digest:
        return f"{spec.name}/{f.name}"
  return None


def verify_manual_dir(name: str, manual_dir: str | os.PathLike[str]) -> dict[str, str]:
  """Checks that ``manual_dir`` holds the official files of dataset ``name``.

  Each expected file must exist and have the official size; files up to
  :data:`HASH_SIZE_LIMIT` must also have the official sha256.

  Returns:
    ``{file name: sha256 or "size-only"}`` for the verified files.

  Raises:
    ManualDirError: with the offending file and, when its digest is that of
      another known dataset, the dataset it belongs to.
  """
  spec = get_spec(name)
  manual_dir = Path(manual_dir).expanduser()
  if not manual_dir.exists():
    raise ManualDirError(f"manual directory {manual_dir} for {name!r} does not exist")
  if not manual_dir.is_dir():
    raise ManualDirError(
      f"manual directory {manual_dir} for {name!r} is a file, not a folder: it must be the "
      f"folder that holds {', '.join(f.name for f in spec.manual_files)}"
    )
  verified: dict[str, str] = {}
  for expected in spec.manual_files:
    path = manual_dir / expected.name
    if not path.is_file():
      raise ManualDirError(
        f"{path} is missing: the manual directory of {name!r} must contain "
        f"{', '.join(f.name for f in spec.manual_files)}"
      )
    size = path.stat().st_size
    if expected.size <= HASH_SIZE_LIMIT:
      digest = sha256_file(path)
      if digest != expected.sha256:
        owner = _owner_of_digest(digest)
        hint = (
          f" It is the file {owner!r}: {manual_dir} holds another dataset."
          if owner
          else " The file is corrupt or not the official release."
        )
        raise ManualDirError(
          f"{path} has sha256 {digest}, but {name!r} expects {expected.sha256}.{hint}"
        )
      verified[expected.name] = digest
    else:
      if size != expected.size:
        raise ManualDirError(f"{path} has {size} bytes, but {name!r} expects {expected.size}")
      verified[expected.name] = "size-only"
  return verified


_TFDS_READY = False


def import_tfds() -> Any:
  """Imports ``tensorflow_datasets`` after two environment fixes.

  * tensorflow-datasets 4.9.x imports the ``importlib_resources`` back-port
    unconditionally but only declares it for Python < 3.9; where it is missing,
    the standard library's ``importlib.resources`` (3.11+ has ``.abc``) stands in.
  * TensorFlow is only used for input pipelines here, so it must not claim GPU
    memory that JAX needs.
  """
  global _TFDS_READY
  if not _TFDS_READY:
    try:
      import importlib_resources  # noqa: F401
    except ImportError:
      import importlib.resources
      import importlib.resources.abc  # noqa: F401  (populates the attribute)

      sys.modules["importlib_resources"] = importlib.resources
    import tensorflow as tf

    try:
      tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised; harmless on CPU
      pass
    _TFDS_READY = True
  import tensorflow_datasets as tfds

  return tfds


def _supply_hint(name: str, data_dir: Path) -> str:
  spec = get_spec(name)
  files = ", ".join(f.name for f in spec.manual_files)
  return (
    f"Supply it in one of these ways:\n"
    f"  * pass --manual-dir DIR (or manual_dir=DIR), DIR holding the official "
    f"files {files};\n"
    f"  * put those files in {SHARED_DATASETS / name} (used by default);\n"
    f"  * pass --data-dir DIR (or set ${DATA_DIR_ENV}) pointing at a TFDS data "
    f"directory in which {spec.tfds_name!r} is already prepared "
    f"(currently {data_dir});\n"
    f"  * or run where the TFDS download of {spec.tfds_name!r} is reachable."
  )


def prepare(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  manual_dir: str | os.PathLike[str] | None = None,
  download: bool = True,
) -> Any:
  """Returns a TFDS builder of ``name`` whose data is prepared in ``data_dir``.

  Args:
    name: a key of :data:`DATASETS`.
    data_dir: TFDS data directory (default :func:`default_data_dir`).
    manual_dir: folder with the original files; default
      :func:`default_manual_dir`.  Verified with :func:`verify_manual_dir`.
    download: whether TFDS may download when no manual directory is available.

  Raises:
    ManualDirError: ``manual_dir`` holds other files than the dataset's.
    DatasetError: the data is neither prepared, nor in a manual directory, nor
      downloadable; the message lists the ways to supply it.
  """
  spec = get_spec(name)
  tfds = import_tfds()
  data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
  builder = tfds.builder(spec.tfds_name, data_dir=str(data_dir))
  # A manual directory that was given is checked even when the data is
  # already prepared: a wrong one is an error, not silently ignored.
  verified = verify_manual_dir(name, manual_dir) if manual_dir else None
  if builder.is_prepared():
    return builder

  manual = Path(manual_dir).expanduser() if manual_dir else default_manual_dir(name)
  if verified is None and manual is not None:
    verified = verify_manual_dir(name, manual)
  if manual is None and not download:
    raise DatasetError(
      f"dataset {name!r} is not prepared in {data_dir} and downloading is "
      f"disabled.\n{_supply_hint(name, data_dir)}"
    )
  # One download (and extraction) directory per dataset: see the module docstring.
  download_dir = data_dir / "downloads" / name
  config = tfds.download.DownloadConfig(
    manual_dir=str(manual) if manual is not None else None,
    extract_dir=str(download_dir / "extracted"),
    # With verified manual files there is nothing to fetch; don't let TFDS try
    # its GCS mirror of prepared data (it hangs without network).
    try_download_gcs=manual is None,
  )
  try:
    builder.download_and_prepare(download_dir=str(download_dir), download_config=config)
  except Exception as e:  # TFDS raises many types (network, checksum, manual dir)
    raise DatasetError(
      f"could not prepare dataset {name!r} in {data_dir}: "
      f"{type(e).__name__}: {e}\n{_supply_hint(name, data_dir)}"
    ) from e
  if verified is not None and builder.is_prepared():
    # Provenance record next to the prepared data, for audits.
    from experiments.fileio import atomic_write_json

    record = {"manual_dir": str(manual), "files": verified}
    atomic_write_json(Path(builder.data_dir) / "optax_gsm_source.json", record)
  return builder


class Batch(NamedTuple):
  """One batch: normalised float32 NHWC ``image``, int32 ``label``, float32 ``mask``."""

  image: np.ndarray
  label: np.ndarray
  mask: np.ndarray


class Pipeline(Protocol):
  """What the training loop needs from an input pipeline."""

  num_examples: int
  batch_size: int
  train: bool

  @property
  def steps_per_epoch(self) -> int: ...

  def epoch(self, epoch: int) -> Iterator[Batch]: ...


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  """The numpy generator that drives every random choice of one epoch."""
  return np.random.default_rng([seed, epoch])


def epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit integer seed for ``tf.data`` derived from ``(seed, epoch)``."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


class InMemoryPipeline:
  """Batches cut from numpy arrays held in memory (MNIST, Fashion-MNIST, CIFAR-10).

  Training epochs visit a permutation of the examples drawn from
  ``epoch_rng(seed, epoch)`` and drop the last incomplete batch (static shapes,
  one compilation).  Evaluation visits the examples in order and pads the last
  batch, marking padding with ``mask == 0``.
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    spec: DatasetSpec,
    batch_size: int,
    train: bool,
    seed: int = 0,
    augment: bool | None = None,
  ):
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
      raise ValueError("images and labels differ in length")
    if train and len(images) < batch_size:
      raise ValueError(f"{len(images)} training examples cannot fill one batch of {batch_size}")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.spec = spec
    self.batch_size = int(batch_size)
    self.train = bool(train)
    self.seed = int(seed)
    self.augment = (spec.augment != "none" and train) if augment is None else augment
    self.num_examples = len(images)
    std = np.asarray(spec.std, np.float32)
    # x_norm = (x / 255 - mean) / std = x * scale + shift, two fused numpy ops.
    self._scale = (1.0 / (255.0 * std)).astype(np.float32)
    self._shift = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)

  @property
  def steps_per_epoch(self) -> int:
    """Number of batches :meth:`epoch` yields."""
    if self.train:
      return self.num_examples // self.batch_size
    return -(-self.num_examples // self.batch_size)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 normalised per channel."""
    return images.astype(np.float32) * self._scale + self._shift

  def _crop_flip(self, images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Zero-pad by 4, crop back to the original size at ``offsets``, mirror where ``flips``."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)  # (n, h)
    cols = offsets[:, 1, None] + np.arange(w)  # (n, w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]

  def epoch(self, epoch: int) -> Iterator[Batch]:
    """Yields the batches of epoch ``epoch`` (deterministic given seed and epoch)."""
    bs = self.batch_size
    if self.train:
      rng = epoch_rng(self.seed, epoch)
      order = rng.permutation(self.num_examples)
      if self.augment:
        offsets = rng.integers(0, 9, size=(self.num_examples, 2))
        flips = rng.random(self.num_examples) < 0.5
      mask = np.ones(bs, np.float32)
      for step in range(self.steps_per_epoch):
        idx = order[step * bs : (step + 1) * bs]
        images = self.images[idx]
        if self.augment:
          images = self._crop_flip(images, offsets[idx], flips[idx])
        yield Batch(self.normalize(images), self.labels[idx], mask)
    else:
      for step in range(self.steps_per_epoch):
        images = self.images[step * bs : (step + 1) * bs]
        labels = self.labels[step * bs : (step + 1) * bs]
        mask = np.ones(bs, np.float32)
        if len(images) < bs:  # pad the last batch to keep shapes static
          pad = bs - len(images)
          mask[len(images) :] = 0.0
          images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
          labels = np.concatenate([labels, np.zeros(pad, np.int32)])
        yield Batch(self.normalize(images), labels, mask)


def load_arrays(builder: Any, split: str, *, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a whole TFDS split into ``(uint8 images, int64 labels)`` numpy arrays."""
  tfds = import_tfds()
  ds = builder.as_dataset(split=split, shuffle_files=False).batch(chunk)
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex["image"])
    labels.append(ex["label"])
  if not images:
    raise DatasetError(f"split {split!r} of {builder.name!r} is empty")
  return np.concatenate(images), np.concatenate(labels)


class ImageNetPipeline:
  """Streams an ImageNet split through ``tf.data``.

  Training: Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3)
  fused with JPEG decoding, resize to ``image_size`` and a random horizontal flip.
  Evaluation: central crop of ``image_size / (image_size + 32)`` of the shorter
  side (224 out of 256), resized to ``image_size``; the last batch is padded.

  Determinism: the file order comes from ``shuffle_seed = epoch_seed(seed, e)``,
  the example shuffle buffer from the same seed, and every example's crop/flip
  from a stateless op seeded by ``(epoch seed, position in the read order)``.
  """

  def __init__(
    self,
    builder: Any,
    split: str,
    *,
    spec: DatasetSpec,
    batch_size: int,
    train: bool,
    seed: int = 0,
    image_size: int = 224,
    num_examples: int | None = None,
    shuffle_buffer: int = 10_000,
  ):
    self.builder = builder
    self.split = split
    self.spec = spec
    self.batch_size = int(batch_size)
    self.train = bool(train)
    self.seed = int(seed)
    self.image_size = int(image_size)
    self.shuffle_buffer = int(shuffle_buffer)
    self.num_examples = self._count() if num_examples is None else int(num_examples)
    if train and self.num_examples < batch_size:
      raise ValueError(
        f"{self.num_examples} training examples cannot fill one batch of {batch_size}"
      )

  def _count(self) -> int:
    tfds = import_tfds()
    try:
      n = int(self.builder.info.splits[self.split].num_examples)
    except Exception:  # unknown split info (e.g. under tfds.testing.mock_data)
      n = 0
    if n > 0:
      return n
    ds = self.builder.as_dataset(split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return sum(1 for _ in ds)

  @property
  def steps_per_epoch(self) -> int:
    if self.train:
      return self.num_examples // self.batch_size
    return -(-self.num_examples // self.batch_size)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def _dataset(self, epoch: int) -> Any:
    tfds = import_tfds()
    import tensorflow as tf

    e_seed = epoch_seed(self.seed, epoch)
    size = self.image_size
    mean = tf.constant(np.asarray(self.spec.mean, np.float32) * 255.0)
    std = tf.constant(np.asarray(self.spec.std, np.float32) * 255.0)
    read_config = tfds.ReadConfig(shuffle_seed=e_seed, shuffle_reshuffle_each_iteration=False)
    ds = self.builder.as_dataset(
      split=self.split,
      shuffle_files=self.train,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=read_config,
    )
    ds = ds.enumerate()
    if self.train:
      ds = ds.shuffle(self.shuffle_buffer, seed=e_seed, reshuffle_each_iteration=False)

    def train_map(index: Any, ex: Any) -> tuple[Any, Any]:
      seed = tf.stack([tf.constant(e_seed, tf.int64), tf.cast(index, tf.int64)])
      data = ex["image"]
      shape = tf.io.extract_jpeg_shape(data)
      whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
      begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole,
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
      )
      oy, ox, _ = tf.unstack(begin)
      h, w, _ = tf.unstack(crop)
      image = tf.image.decode_and_crop_jpeg(data, tf.stack([oy, ox, h, w]), channels=3)
      image = tf.image.resize(image, [size, size], method="bilinear")
      image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
      return (image - mean) / std, tf.cast(ex["label"], tf.int32)

    def eval_map(index: Any, ex: Any) -> tuple[Any, Any]:
      del index
      data = ex["image"]
      shape = tf.io.extract_jpeg_shape(data)
      h, w = shape[0], shape[1]
      crop = tf.cast(size / (size + 32) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
      crop = tf.maximum(crop, 1)
      oy, ox = (h - crop + 1) // 2, (w - crop + 1) // 2
      image = tf.image.decode_and_crop_jpeg(data, tf.stack([oy, ox, crop, crop]), channels=3)
      image = tf.image.resize(image, [size, size], method="bilinear")
      return (image - mean) / std, tf.cast(ex["label"], tf.int32)

    ds = ds.map(
      train_map if self.train else eval_map,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    ds = ds.batch(self.batch_size, drop_remainder=self.train)
    return ds.prefetch(tf.data.AUTOTUNE)

  def epoch(self, epoch: int) -> Iterator[Batch]:
    """Yields the batches of epoch ``epoch`` (deterministic given seed and epoch)."""
    steps = 0
    for images, labels in self._dataset(epoch).as_numpy_iterator():
      n = len(labels)
      mask = np.ones(self.batch_size, np.float32)
      if n < self.batch_size:
        pad = self.batch_size - n
        mask[n:] = 0.0
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      yield Batch(images, labels, mask)
      steps += 1
      if steps >= self.steps_per_epoch:
        return


def _split_name(spec: DatasetSpec, split: str, subset: int | None) -> str:
  base = {"train": spec.train_split, "test": spec.eval_split, "eval": spec.eval_split}.get(
    split, split
  )
  return f"{base}[:{int(subset)}]" if subset else base


def load(
  name: str,
  split: str = "train",
  *,
  batch_size: int,
  train: bool | None = None,
  seed: int = 0,
  data_dir: str | os.PathLike[str] | None = None,
  manual_dir: str | os.PathLike[str] | None = None,
  subset: int | None = None,
  image_size: int = 224,
  download: bool = True,
  builder: Any = None,
) -> InMemoryPipeline | ImageNetPipeline:
  """Prepares (if needed) and returns an input pipeline for one split.

  Args:
    name: dataset, a key of :data:`DATASETS`.
    split: ``"train"``, ``"test"``/``"eval"`` (the dataset's evaluation split) or
      any TFDS split name.
    batch_size: examples per batch.
    train: shuffle + augment + drop the last partial batch; defaults to
      ``split == "train"``.
    seed: seed of the per-epoch randomness (see :func:`epoch_rng`).
    data_dir, manual_dir, download: see :func:`prepare`.
    subset: use only the first ``subset`` examples of the split (quick runs).
    image_size: output resolution of ImageNet crops.
    builder: an already prepared TFDS builder (skips :func:`prepare`).
  """
  spec = get_spec(name)
  if builder is None:
    builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
  train = (split == "train") if train is None else train
  tfds_split = _split_name(spec, split, subset)
  if spec.in_memory:
    images, labels = load_arrays(builder, tfds_split)
    # Every split and every subset size: the fingerprint of its first examples.
    check_identity(name, _split_name(spec, split, None), images, labels, builder.data_dir)
    if spec.expected_train_mean is not None and split == "train" and not subset:
      mean = float(images.mean()) / 255.0
      if abs(mean - spec.expected_train_mean) > 0.005:
        raise DatasetError(
          f"the prepared {name!r} in {builder.data_dir} does not look like "
          f"{name}: mean pixel {mean:.4f}, expected "
          f"{spec.expected_train_mean:.4f}. It was probably built from another "
          f"dataset's files; delete {builder.data_dir} and prepare again."
        )
    return InMemoryPipeline(
      images, labels, spec=spec, batch_size=batch_size, train=train, seed=seed
    )
  num_examples = None
  if subset:
    try:
      total = int(builder.info.splits[_split_name(spec, split, None)].num_examples)
    except Exception:
      total = 0
    num_examples = min(int(subset), total) if total > 0 else None
  return ImageNetPipeline(
    builder,
    tfds_split,
    spec=spec,
    batch_size=batch_size,
    train=train,
    seed=seed,
    image_size=image_size,
    num_examples=num_examples,
  )


def load_splits(
  name: str,
  *,
  batch_size: int,
  eval_batch_size: int,
  seed: int = 0,
  data_dir: str | os.PathLike[str] | None = None,
  manual_dir: str | os.PathLike[str] | None = None,
  subset: int | None = None,
  eval_subset: int | None = None,
  image_size: int = 224,
  download: bool = True,
  builder: Any = None,
) -> tuple[InMemoryPipeline | ImageNetPipeline, InMemoryPipeline | ImageNetPipeline]:
  """``(train, test)`` pipelines of one dataset, prepared once.

  :func:`load` of the ``"train"`` split (shuffled and augmented) and of the
  evaluation split (in order, padded), from one :func:`prepare`.  The programs
  that train and evaluate (:mod:`experiments.run`, :mod:`experiments.structured`)
  all load their data here.

  Args:
    name: dataset, a key of :data:`DATASETS`.
    batch_size, eval_batch_size: examples per training / evaluation batch.
    seed: seed of the training order and augmentation.
    data_dir, manual_dir, download: see :func:`prepare`.
    subset, eval_subset: use only the first N examples of the training /
      evaluation split (quick runs).
    image_size: output resolution of ImageNet crops.
    builder: an already prepared TFDS builder (skips :func:`prepare`).

  Returns:
    ``(train, test)``.

  Example::

    train, test = load_splits("mnist", batch_size=64, eval_batch_size=500)
    train.steps_per_epoch, test.steps_per_epoch    # (937, 20)
  """
  if builder is None:
    builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
  train = load(
    name,
    "train",
    batch_size=batch_size,
    seed=seed,
    subset=subset,
    image_size=image_size,
    builder=builder,
  )
  test = load(
    name,
    "test",
    batch_size=eval_batch_size,
    seed=seed,
    subset=eval_subset,
    image_size=image_size,
    builder=builder,
  )
  return train, test


def measure_throughput(
  pipeline: Pipeline, *, epoch: int = 0, max_batches: int = 100, warmup: int = 2
) -> dict[str, float]:
  """Measures how many images per second ``pipeline`` delivers on its own.

  Iterates up to ``warmup + max_batches`` batches of ``epoch`` (the first
  ``warmup`` are not timed: they include the ``tf.data`` start-up) and touches
  every array so lazily produced data is materialised.

  Returns:
    ``{"images_per_s", "batches", "seconds", "batch_size"}``.
  """
  it = pipeline.epoch(epoch)
  for _ in range(warmup):
    if next(it, None) is None:
      break
  n = 0
  start = time.perf_counter()
  for batch in it:
    # Touch the data so nothing stays lazy.
    float(batch.image[0, 0, 0, 0])
    n += 1
    if n >= max_batches:
      break
  seconds = time.perf_counter() - start
  images = n * pipeline.batch_size
  return {
    "images_per_s": images / seconds if seconds > 0 else float("inf"),
    "batches": float(n),
    "seconds": seconds,
    "batch_size": float(pipeline.batch_size),
  }


def _main(argv: list[str] | None = None) -> int:
  """``python -m experiments.data {prepare,throughput} NAME [...]``."""
  import argparse

  from experiments.fileio import manual_dir_arg

  parser = argparse.ArgumentParser(
    prog="python -m experiments.data", description=__doc__.split("\n")[0]
  )
  parser.add_argument("command", choices=["prepare", "throughput", "verify"])
  parser.add_argument("name", choices=sorted(DATASETS))
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--manual-dir", default=None, type=manual_dir_arg)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--split", default="train")
  args = parser.parse_args(argv)
  try:
    return _command(args, parser)
  except DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _command(args: Any, parser: Any) -> int:
  if args.command == "verify":
    manual = args.manual_dir or default_manual_dir(args.name)
    if manual is None:
      parser.error(f"no manual directory for {args.name}; pass --manual-dir")
    for file, digest in verify_manual_dir(args.name, manual).items():
      print(f"ok  {file}  {digest}")
    return 0
  if args.command == "prepare":
    builder = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    print(f"{args.name} prepared in {builder.data_dir}")
    return 0
  pipe = load(
    args.name,
    args.split,
    batch_size=args.batch_size,
    data_dir=args.data_dir,
    manual_dir=args.manual_dir,
  )
  stats = measure_throughput(pipe)
  print(
    f"{args.name}/{args.split}: {stats['images_per_s']:.0f} images/s "
    f"({stats['batches']:.0f} batches of {args.batch_size} in {stats['seconds']:.2f} s)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(_main())
