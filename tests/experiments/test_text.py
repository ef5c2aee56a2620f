"""The standard library's sources as a byte-level language-model corpus."""

import os

import numpy as np
import pytest

from experiments import text


def _write(folder, files: dict[str, bytes]) -> str:
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  return str(folder)


def test_the_real_standard_library_splits_by_file_into_windows():
  data = text.load_stdlib_text(context=64, test_bytes=8192, train_bytes=65536)
  files = text.stdlib_files()
  test = {os.path.basename(f) for f in files if text.is_test_file(f, 0.2)}
  # about a fifth of the files, by name hash
  assert 0.1 * len(files) < len(test) < 0.3 * len(files)
  assert data.test_files == len(test)
  assert data.train_files == len(files) - len(test)
  assert data.x_train.shape == (65536 // 64 - 1, 64)
  assert data.x_test.shape == (8192 // 64 - 1, 64)
  assert data.x_train.dtype == np.uint8 and data.num_classes == 256
  # targets are the inputs shifted by one byte, across window boundaries too
  np.testing.assert_array_equal(data.x_train[:, 1:], data.y_train[:, :-1])
  np.testing.assert_array_equal(data.y_train[:-1, -1], data.x_train[1:, 0])
  assert data.prepare(data.x_test[:2]).dtype == np.int32
  assert "standard library" in data.describe()


def test_no_test_file_text_reaches_training(tmp_path):
  files = {f"m{i}.py": f"# file {i}\n".encode() * (20 + i) for i in range(40)}
  root = _write(tmp_path, files)
  data = text.load_stdlib_text(context=8, test_fraction=0.25, root=root)
  train = data.x_train.tobytes() + data.y_train[-1:, -1].tobytes()
  test = data.x_test.tobytes()
  for name, body in files.items():
    in_test = text.is_test_file(name, 0.25)
    line = body[: body.index(b"\n") + 1]
    assert (line in test) == in_test, name
    assert (line in train) != in_test, name


def test_split_depends_on_the_name_only(tmp_path):
  assert text.is_test_file("/a/b/json.py", 0.3) == text.is_test_file(
    "json.py", 0.3
  )
  # the same seed gives the same bytes; another seed another file order
  root = _write(tmp_path, {f"f{i}.py": bytes([65 + i]) * 50 for i in range(30)})
  a = text.load_stdlib_text(context=16, root=root, seed=0)
  b = text.load_stdlib_text(context=16, root=root, seed=0)
  c = text.load_stdlib_text(context=16, root=root, seed=1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert not np.array_equal(a.x_train, c.x_train)
  # the same files, each whole, in another order
  files = text.stdlib_files(root)
  streams = [text._stream(files, seed, None) for seed in (0, 1)]
  assert not np.array_equal(*streams)
  np.testing.assert_array_equal(*(np.sort(s) for s in streams))


def test_files_end_with_the_separator_which_their_text_never_holds(tmp_path):
  root = _write(
    tmp_path, {f"f{i}.py": b"ab\x00cd" + bytes([70 + i]) for i in range(20)}
  )
  data = text.load_stdlib_text(context=4, root=root, test_fraction=0.5)
  stream = np.concatenate([data.x_train.ravel(), data.y_train[-1:, -1]])
  # every file's text has its NUL removed and one NUL appended
  ends = np.flatnonzero(stream == text.SEPARATOR)
  assert np.all(np.diff(ends) == 6)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_test_fraction_is_rejected(fraction):
  with pytest.raises(ValueError, match="test_fraction must be in"):
    text.is_test_file("x.py", fraction)


def test_a_folder_without_sources_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.py files in"):
    text.load_stdlib_text(root=str(tmp_path))


def test_a_split_too_short_for_one_window_is_named(tmp_path):
  root = _write(tmp_path, {f"f{i}.py": b"x" for i in range(20)})
  with pytest.raises(ValueError, match="holds no window of 65"):
    text.load_stdlib_text(context=64, root=root)
