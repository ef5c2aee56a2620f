"""``summary``: bit-widths, sparsity, bytes and totals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from tests.conftest import PINNED, STRATIFIED_PER_TENSOR


@pytest.mark.parametrize(
  "max_count,bits", [(0, 1), (1, 2), (2, 3), (3, 3), (4, 4), (127, 8), (128, 9)]
)
def test_bit_width(max_count, bits):
  assert mcq_jax.bit_width(max_count) == bits


def test_summary_of_a_quantized_tree():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  params = {
    "dense": {"kernel": w, "bias": jnp.zeros(32)},
    "step": jnp.array(3, jnp.int32),
  }
  q = mcq_jax.quantize(
    params, jax.random.key(1), samples_per_weight=0.5, **STRATIFIED_PER_TENSOR
  )
  report = mcq_jax.summary(q)
  by_path = {leaf.path: leaf for leaf in report.leaves}
  assert set(by_path) == {"dense/bias", "dense/kernel", "step"}

  kernel = by_path["dense/kernel"]
  values = np.asarray(q["dense"]["kernel"].values)
  assert kernel.quantized and kernel.groups == 1 and kernel.samples == 1024
  assert kernel.bits == 1 + int(np.ceil(np.log2(np.abs(values).max() + 1)))
  assert kernel.sparsity == pytest.approx(np.mean(values == 0))
  assert (
    kernel.sparsity > 0.4
  )  # K = 0.5: at least half the weights get no sample
  assert kernel.bytes == int(np.ceil(2048 * kernel.bits / 8)) + 4
  assert kernel.float32_bytes == 2048 * 4

  bias = by_path["dense/bias"]
  assert not bias.quantized and bias.bits == 32 and bias.bytes == 128
  step = by_path["step"]
  assert step.bytes == 4 and step.float32_bytes == 4

  assert report.total_bytes == kernel.bytes + 128 + 4
  assert report.float32_bytes == 8192 + 128 + 4
  assert report.compression == pytest.approx(
    report.float32_bytes / report.total_bytes
  )
  assert report.mean_bits == kernel.bits
  text = str(report)
  assert (
    "dense/kernel" in text
    and "64x32" in text
    and f"{report.total_bytes} bytes" in text
  )


def test_per_channel_summary_counts_groups_and_scales():
  w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  q = mcq_jax.quantize(
    {"k": w},
    jax.random.key(1),
    granularity="per_channel",
    samples_per_weight=1.0,
    sampler="stratified",
  )
  leaf = mcq_jax.summary(q).leaves[0]
  assert leaf.groups == 16 and leaf.samples == 16 * 72
  assert leaf.bytes == int(np.ceil(w.size * leaf.bits / 8)) + 16 * 4


def test_more_samples_more_bits_fewer_zeros():
  w = jax.random.normal(jax.random.key(0), (128, 128))
  reports = [
    mcq_jax.summary(
      mcq_jax.quantize(
        {"k": w},
        jax.random.key(1),
        samples_per_weight=k,
        **STRATIFIED_PER_TENSOR,
      )
    )
    for k in (0.25, 1.0, 4.0, 16.0)
  ]
  bits = [r.mean_bits for r in reports]
  zeros = [r.sparsity for r in reports]
  assert bits == sorted(bits) and bits[0] < bits[-1]
  assert zeros == sorted(zeros, reverse=True) and zeros[0] > zeros[-1]


def test_empty_tree_and_empty_leaf():
  assert mcq_jax.summary({}).total_bytes == 0
  assert mcq_jax.summary({}).compression == 1.0
  q = mcq_jax.quantize({"e": jnp.zeros((0, 3))}, jax.random.key(0), **PINNED)
  leaf = mcq_jax.summary(q).leaves[0]
  assert leaf.bits == 1 and leaf.sparsity == 0.0 and leaf.bytes == 4


def test_entropy_bits():
  assert mcq_jax.entropy_bits(np.zeros(10, np.int8)) == 0.0
  assert mcq_jax.entropy_bits(np.array([1, -1, 2, -2])) == 2.0
  assert mcq_jax.entropy_bits(np.array([], np.int32)) == 0.0
  w = jax.random.normal(jax.random.key(0), (256, 64))
  report = mcq_jax.summary(
    mcq_jax.quantize({"k": w}, jax.random.key(1), **PINNED)
  )
  leaf = report.leaves[0]
  values = np.asarray(
    mcq_jax.quantize({"k": w}, jax.random.key(1), **PINNED)["k"].values
  )
  _, counts = np.unique(values, return_counts=True)
  p = counts / values.size
  assert leaf.entropy_bits == pytest.approx(-(p * np.log2(p)).sum())
  # an entropy coder needs fewer bits than the fixed bit-width, never more
  assert 0 < leaf.entropy_bits < leaf.bits
  assert report.mean_entropy_bits == pytest.approx(leaf.entropy_bits)


def test_a_bit_budget_shows_each_groups_n():
  w = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
  w[:, 1] *= np.linspace(0.0, 1.0, 32) ** 4  # a peaked channel: fewer samples
  q = mcq_jax.quantize({"kernel": w}, jax.random.key(0), bits=4)
  leaf = mcq_jax.summary(q).leaves[0]
  totals = np.abs(np.asarray(q["kernel"].values, np.int64)).sum(axis=0)
  assert leaf.samples_per_group == tuple(totals.tolist())
  assert leaf.samples == totals.sum() and leaf.bits <= 4
  assert len(set(leaf.samples_per_group)) > 1
  low, high = min(totals), max(totals)
  assert f"{totals.sum()} ({low}-{high}/group)" in str(mcq_jax.summary(q))
