"""The exact int8 convolution of the integer conv layers.

A 2-D convolution (NHWC input, HWIO kernel, NHWC output) of int8 weights
and int8 or int16 activations, summed in int32: on a CPU with AVX512-VNNI
the native kernel ``conv.cc`` (:mod:`mcq_jax._native`), which gathers each
chunk of output pixels' patches and multiplies them with the packed kernel;
elsewhere (and for batched kernels under ``vmap``) XLA's int32 convolution.
Both are the exact result modulo ``2**32`` (the callers prove it fits
int32). XLA:CPU's own convolutions of small channel counts run slowly in
float32 and int8 alike (a LeNet's 1 -> 6 channel 5x5 layer on 256 28x28
images: ~10 ms in float32, where its integer sums need well under 1 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mcq_jax import _int8_matmul, _native, _sampling

# The layouts the kernel reads: lax's (batch, feature, spatial...) specs.
NHWC = (0, 3, 1, 2)
HWIO = (3, 2, 0, 1)


class _Window(NamedTuple):
  """How the kernel slides: strides, ``((top, bottom), (left, right))``
  padding and kernel dilation."""

  strides: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]


def _xla_conv(x: jax.Array, w: jax.Array, window: _Window) -> jax.Array:
  return lax.conv_general_dilated(
    x.astype(jnp.int32),
    w.astype(jnp.int32),
    window.strides,
    window.pads,
    rhs_dilation=window.dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.int32,
  )


def _out_size(
  size: int, k: int, stride: int, pad: tuple[int, int], d: int
) -> int:
  """An output side: the input padded, less the dilated kernel, by stride."""
  return max(0, (size + pad[0] + pad[1] - (d * (k - 1) + 1)) // stride + 1)


def _kernel(x: jax.Array, w: jax.Array, window: _Window) -> jax.Array:
  strides, pads, dilation = window
  shape = (
    x.shape[0],
    _out_size(x.shape[1], w.shape[0], strides[0], pads[0], dilation[0]),
    _out_size(x.shape[2], w.shape[1], strides[1], pads[1], dilation[1]),
    w.shape[3],
  )
  out = jax.ffi.ffi_call(
    _native.INT8_CONV_TARGET, jax.ShapeDtypeStruct(shape, jnp.int32)
  )(
    x,
    w,
    stride_h=strides[0],
    stride_w=strides[1],
    pad_top=pads[0][0],
    pad_left=pads[1][0],
    dilation_h=dilation[0],
    dilation_w=dilation[1],
  )
  return _sampling._varying_like(out, x, w)


def _conv(x: jax.Array, w: jax.Array, window: _Window) -> jax.Array:
  @jax.custom_batching.custom_vmap
  def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    if not _int8_matmul.native_serves(x, w):
      return _xla_conv(x, w, window)
    return lax.platform_dependent(
      x,
      w,
      cpu=lambda x, w: _kernel(x, w, window),
      default=lambda x, w: _xla_conv(x, w, window),
    )

  @conv.def_vmap
  def rule(axis_size, in_batched, x, w):  # type: ignore[no-untyped-def]
    x_batched, w_batched = in_batched
    if not w_batched:  # then x is: a larger batch of images
      folded = conv(x.reshape(-1, *x.shape[2:]), w)
      return folded.reshape(axis_size, -1, *folded.shape[1:]), True
    xla = lambda x, w: _xla_conv(x, w, window)
    return jax.vmap(xla, (0 if x_batched else None, 0))(x, w), True

  return conv(x, w)


def int8_conv(
  x: jax.Array,
  w: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  dilation: Sequence[int],
) -> jax.Array:
  """The 2-D convolution of int8 (or int16) ``x`` (NHWC) with int8 ``w``
  (HWIO), int32 result (the exact sums modulo ``2**32``).

  Args:
    x: int8 or int16, ``(batch, height, width, channels)``.
    w: int8, ``(kh, kw, channels, outputs)``.
    strides: the window strides, 2 ints.
    pads: ``((top, bottom), (left, right))`` padding.
    dilation: the kernel dilation, 2 ints.

  Returns:
    int32, ``(batch, out_height, out_width, outputs)``.
  """
  if x.dtype not in (jnp.int8, jnp.int16) or w.dtype != jnp.int8:
    raise TypeError(
      f"int8 or int16 activations and int8 weights expected, got {x.dtype}"
      f" and {w.dtype}"
    )
  if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
    raise ValueError(
      f"an NHWC input and HWIO kernel expected, got {x.shape} and {w.shape}"
    )
  strides_ = (int(strides[0]), int(strides[1]))
  pads_ = (
    (int(pads[0][0]), int(pads[0][1])),
    (int(pads[1][0]), int(pads[1][1])),
  )
  dilation_ = (int(dilation[0]), int(dilation[1]))
  if min(*strides_, *dilation_) < 1:
    raise ValueError(
      f"strides {strides_} and dilation {dilation_} must be >= 1"
    )
  return _conv(x, w, _Window(strides_, pads_, dilation_))
