"""The exact int8 matrix product of the integer layers.

``a . w`` of int8 weights and int8 (or int16) activations, summed in int32.
On a CPU with AVX512-VNNI it runs as the native kernel ``matmul.cc``
(:mod:`mcq_jax._native`), which multiplies 64 byte pairs per instruction
(int16 activations as two int8 digits); XLA:CPU's own int8 product runs only
1.2-1.3x faster than float32 and a single row ~2x slower (measured on jax
0.10).
Elsewhere, and where the kernel is not built, XLA's product runs. The two
give the same integers: int32 sums wrap the same way in any order, so both
are the exact product modulo ``2**32`` (the callers prove it fits int32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mcq_jax import _native, _sampling, _sharded


def _xla_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """XLA's product (int16 activations: in int32). A single int8 row is
  computed as two, the second zero, and the first result kept: XLA:CPU runs
  an int8 matrix-vector product by converting the whole kernel to int32
  first, which costs twice the two-row int8 product (a 784x512 kernel:
  0.31 ms against 0.15 ms, jax 0.10)."""
  if x.dtype != w.dtype:
    x, w = x.astype(jnp.int32), w.astype(jnp.int32)
  single = x.shape[0] == 1
  if single:
    x = jnp.concatenate([x, jnp.zeros_like(x)])
  out = lax.dot_general(
    x,
    w,
    (((1,), (0,)), ((), ())),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.int32,
  )
  return out[:1] if single else out


def _kernel(x: jax.Array, w: jax.Array) -> jax.Array:
  out = jax.ffi.ffi_call(
    _native.INT8_MATMUL_TARGET,
    jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.int32),
  )(x, w)
  # under shard_map, as varying as XLA's product would be
  return _sampling._varying_like(out, x, w)


def native_available() -> bool:
  """Whether the native products are built (and so serve the CPU)."""
  status = _native.native_status()
  return status.available and status.int8_matmul


def native_serves(*operands: jax.Array) -> bool:
  """Whether a native product takes these operands on the CPU: it is built,
  and no operand is split over devices in its type (or eagerly), where
  XLA's partitioner places its own product (the kernel's result would carry
  no sharding)."""
  return native_available() and not any(_sharded.mesh_axes(x) for x in operands)


@jax.custom_batching.custom_vmap
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  if x.size == 0 or w.size == 0 or not native_serves(x, w):
    return _xla_matmul(x, w)
  return lax.platform_dependent(x, w, cpu=_kernel, default=_xla_matmul)


@_matmul.def_vmap
def _matmul_vmap(
  axis_size: int, in_batched: list[bool], x: jax.Array, w: jax.Array
) -> tuple[jax.Array, bool]:
  """A batch of inputs against one kernel is one taller product; batched
  kernels run as XLA's product, batched."""
  x_batched, w_batched = in_batched
  if not w_batched:  # then x is
    rows = x.reshape(axis_size * x.shape[1], x.shape[2])
    return _matmul(rows, w).reshape(axis_size, x.shape[1], w.shape[1]), True
  return jax.vmap(_xla_matmul, (0 if x_batched else None, 0))(x, w), True


def int8_matmul(x: jax.Array, w: jax.Array, contracting: int = 1) -> jax.Array:
  """``x . w`` over the last ``contracting`` axes of ``x`` and the first of
  ``w``, int8 weights, int32 result (the exact product modulo ``2**32``).

  Args:
    x: int8 or int16, ``(*free_x, *summed)``.
    w: int8, ``(*summed, *free_w)``.
    contracting: how many axes are summed.

  Returns:
    int32 of shape ``(*free_x, *free_w)``.
  """
  if x.dtype not in (jnp.int8, jnp.int16) or w.dtype != jnp.int8:
    raise TypeError(
      f"int8 or int16 activations and int8 weights expected, got {x.dtype}"
      f" and {w.dtype}"
    )
  free_x = x.shape[: x.ndim - contracting]
  summed = x.shape[x.ndim - contracting :]
  if tuple(w.shape[:contracting]) != tuple(summed):
    raise ValueError(
      f"contracted axes differ: {summed} and {w.shape[:contracting]}"
    )
  free_w = w.shape[contracting:]
  k = math.prod(summed)
  out = _matmul(
    x.reshape(math.prod(free_x), k), w.reshape(k, math.prod(free_w))
  )
  return out.reshape(*free_x, *free_w)
