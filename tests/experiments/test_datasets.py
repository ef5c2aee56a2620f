"""Embedded datasets and the TFDS path, offline (mocked data, no download)."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import datasets


@pytest.mark.parametrize(
  "loader, shape, n, test",
  [
    (datasets.load_digits, (8, 8, 1), 1797, 450),
    (datasets.load_mnist5k, (28, 28, 1), 5000, 1000),
  ],
)
def test_embedded_datasets_are_real_and_split_per_class(loader, shape, n, test):
  data = loader()
  assert data.input_shape == shape and data.num_classes == 10
  assert len(data.y_train) + len(data.y_test) == n and len(data.y_test) == test
  # every class keeps its share of the test split
  per_class = np.bincount(data.y_test, minlength=10) / np.bincount(
    np.concatenate([data.y_train, data.y_test]), minlength=10
  )
  assert np.allclose(per_class, test / n, atol=0.01)
  x = data.prepare(data.x_test)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  # the same seed gives the same split; another seed another one
  np.testing.assert_array_equal(loader().y_test, data.y_test)
  assert not np.array_equal(loader(seed=1).x_test, data.x_test)


@pytest.mark.parametrize(
  "name, shape",
  [
    ("mnist", (28, 28, 1)),
    ("fashion_mnist", (28, 28, 1)),
    ("cifar10", (32, 32, 3)),
    ("svhn_cropped", (32, 32, 3)),
  ],
)
def test_tfds_catalog_datasets_through_the_data_source(name, shape):
  with tfds.testing.mock_data(num_examples=12):
    data = datasets.load_tfds(name, progress=False)
    subset = datasets.load_tfds(name, train_examples=5, progress=False)
  assert data.input_shape == shape and data.x_train.dtype == np.uint8
  assert (
    len(data.y_train) == 12
    and len(data.y_test) == 12
    and data.num_classes == 10
  )
  assert len(subset.y_train) == 5 and len(subset.y_test) == 12
  x = data.prepare(data.x_train)
  assert x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_imagenet_is_cropped_and_resized_to_image_size():
  with tfds.testing.mock_data(num_examples=3):
    data = datasets.load_tfds("imagenet2012", image_size=40, progress=False)
    with pytest.raises(ValueError, match="image_size"):
      datasets.load_tfds("imagenet2012", progress=False)
  assert data.input_shape == (40, 40, 3) and data.num_classes == 1000
  assert data.mean == datasets._IMAGENET_MEAN


def test_center_crop_resize_keeps_the_center():
  image = np.zeros((60, 100, 3), np.uint8)
  image[:, 20:80] = 255  # the central 60 x 60 square is white
  out = datasets._center_crop_resize(image, 30)
  assert out.shape == (30, 30, 3) and out.min() == 255


def test_missing_tfds_data_fails_at_once_without_download(tmp_path):
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="'mnist' is not prepared"):
    datasets.load_tfds(
      "mnist", data_dir=str(tmp_path), download=False, progress=False
    )
  assert time.perf_counter() - start < 30  # no network retries


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown TFDS dataset 'emnist'"):
    datasets.load_tfds("emnist")
  from ml_collections import ConfigDict

  with pytest.raises(ValueError, match="unknown dataset 'nope'"):
    datasets.load(ConfigDict({"name": "nope"}))
  with pytest.raises(ValueError, match="test_fraction"):
    datasets.load_digits(test_fraction=1.5)
