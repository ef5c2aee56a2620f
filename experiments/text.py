"""Real text every Python installation has offline: the standard library's
own source files, as bytes, for a byte-level language model.

The corpus is the ``*.py`` files at the top level of the running Python's
standard library (``sysconfig.get_paths()["stdlib"]``; subpackages and their
test suites are left out), split **by file** into train and test: a file's
split is a hash of its name, so a test file's text is never seen in training
and the split does not depend on which other files exist. The files of each
split are shuffled with a seed and concatenated (each followed by a NUL
byte, which no source file contains), then cut into windows of ``context``
bytes: the model reads bytes ``t`` and predicts byte ``t + 1``.

The numbers depend on the Python version (its standard library is the
data); reports name the version and the corpus sizes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import sysconfig
import zlib

import numpy as np

# The byte ending each file in the concatenated stream (absent from sources).
SEPARATOR = 0
VOCAB = 256


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """Windows of a byte stream: ``x[i, t]`` is followed by ``y[i, t]``.

  The same interface as :class:`experiments.datasets.Dataset`, so training
  and the sweep's evaluator use it unchanged: ``num_classes`` is the
  vocabulary (256 byte values) and ``prepare`` turns stored bytes into the
  model's int32 input.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  train_files: int
  test_files: int
  source: str

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  def prepare(self, x: np.ndarray) -> np.ndarray:
    """Stored bytes (uint8) to the model's token ids (int32)."""
    return np.asarray(x, np.int32)

  def describe(self) -> str:
    return (
      f"{self.name} ({self.train_files} train / {self.test_files} test files"
      f" of {self.source}; {self.x_train.size:,} train / {self.x_test.size:,}"
      f" test bytes in windows of {self.input_shape[0]})"
    )


def stdlib_files(root: str | None = None) -> list[str]:
  """The top-level ``*.py`` files of the standard library, sorted.

  Raises:
    FileNotFoundError: ``root`` holds no Python source (an installation that
      ships bytecode only).
  """
  root = root or sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "*.py")))
  if not files:
    raise FileNotFoundError(
      f"no *.py files in {root!r}: this Python ships no standard library"
      " sources, which the stdlib_text dataset is made of"
    )
  return files


def is_test_file(path: str, test_fraction: float) -> bool:
  """The split of one file: a hash of its name (not its path or content),
  so each file keeps its split across machines and library versions."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  bucket = zlib.crc32(os.path.basename(path).encode()) % 10_000
  return bucket < round(test_fraction * 10_000)


def _stream(files: list[str], seed: int, limit: int | None) -> np.ndarray:
  """The files' bytes in a seeded order, each followed by ``SEPARATOR``,
  cut to ``limit`` bytes."""
  order = np.random.default_rng(seed).permutation(len(files))
  parts, total = [], 0
  for i in order:
    with open(files[i], "rb") as f:
      data = f.read().replace(bytes([SEPARATOR]), b"")
    parts.append(np.frombuffer(data + bytes([SEPARATOR]), np.uint8))
    total += len(parts[-1])
    if limit is not None and total >= limit:
      break
  stream = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
  return stream if limit is None else stream[:limit]


def _windows(stream: np.ndarray, context: int) -> tuple[np.ndarray, ...]:
  """Non-overlapping windows: inputs ``stream[s:s+T]``, targets shifted by
  one byte."""
  count = (len(stream) - 1) // context
  if count < 1:
    raise ValueError(
      f"a stream of {len(stream)} bytes holds no window of {context + 1}"
    )
  idx = np.arange(count)[:, None] * context + np.arange(context)[None, :]
  return stream[idx], stream[idx + 1]


def load_stdlib_text(
  context: int = 128,
  test_fraction: float = 0.2,
  seed: int = 0,
  train_bytes: int | None = None,
  test_bytes: int | None = None,
  root: str | None = None,
) -> TextDataset:
  """The standard library's sources as train and test windows of bytes.

  Args:
    context: bytes per window (the model's context length).
    test_fraction: the share of files (by name hash) held out for testing.
    seed: the order in which each split's files are concatenated.
    train_bytes: keep the first this many bytes of the train stream (all
      when ``None``).
    test_bytes: the same for the test stream.
    root: the folder to read (the running Python's standard library when
      ``None``).

  Returns:
    A :class:`TextDataset` whose ``x``/``y`` are uint8 ``(windows,
    context)``.

  Raises:
    ValueError: a split with no file or too few bytes for one window.
  """
  files = stdlib_files(root)
  test = [f for f in files if is_test_file(f, test_fraction)]
  train = [f for f in files if not is_test_file(f, test_fraction)]
  for split, chosen in (("train", train), ("test", test)):
    if not chosen:
      raise ValueError(
        f"test_fraction {test_fraction} leaves no {split} file among the"
        f" {len(files)} files of {root or 'the standard library'}"
      )
  x_train, y_train = _windows(_stream(train, seed, train_bytes), context)
  x_test, y_test = _windows(_stream(test, seed, test_bytes), context)
  version = ".".join(map(str, sys.version_info[:3]))
  return TextDataset(
    name="stdlib_text",
    x_train=x_train,
    y_train=y_train,
    x_test=x_test,
    y_test=y_test,
    num_classes=VOCAB,
    train_files=len(train),
    test_files=len(test),
    source=f"Python {version}'s standard library" if root is None else root,
  )
