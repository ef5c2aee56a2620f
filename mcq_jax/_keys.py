"""Key derivation: one independent ``jax.random`` key per leaf, layer and group.

Keys are derived from *names* (a leaf's path, a layer call's path) rather
than from positions, so adding or removing other leaves or layers does not
change how this one is sampled.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from mcq_jax._typing import PRNGKey


def path_key(key: PRNGKey, path: str) -> PRNGKey:
  """The key of the leaf or layer call named ``path``.

  Args:
    key: the user's key.
    path: the ``/``-joined path of the leaf or layer call.

  Returns:
    ``fold_in(key, crc32(path))`` (31 bits, so it fits ``fold_in``'s data).

  Examples:
    >>> import jax
    >>> from mcq_jax._keys import path_key
    >>> a = path_key(jax.random.key(0), "Dense_0/kernel")
    >>> b = path_key(jax.random.key(0), "Dense_1/kernel")
    >>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
    True
  """
  if _is_threefry(key) and key.ndim == 0:
    return _fold_in(key, jnp.uint32(path_hash(path)))
  return jax.random.fold_in(key, path_hash(path))


def path_hash(path: str) -> int:
  """The 31-bit hash of a path that :func:`path_key` folds into the key."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def group_keys(key: PRNGKey, num_groups: int) -> PRNGKey:
  """``num_groups`` keys, ``fold_in(key, g)`` for group ``g``."""
  groups = jnp.arange(num_groups, dtype=jnp.uint32)
  if _is_threefry(key) and key.ndim == 0:
    return _fold_in(key, groups)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, groups)


# Threefry-2x32, the default jax.random generator, written out: XLA:CPU
# lowers jax's own as a loop of 5 steps (kept rolled to save compile time),
# whose dispatch costs ~35 us per call for a few hundred keys, three calls per
# sampled layer. Unrolled, it is one elementwise fusion. The same integers:
# the tests compare it with jax.random for many keys.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _threefry2x32(
  k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds of the key ``(k0, k1)`` on the counters
  ``(x0, x1)`` (uint32, broadcasting)."""
  rotl = lambda x, r: (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for step in range(5):
    for r in _ROTATIONS[step % 2]:
      x0 = x0 + x1
      x1 = x0 ^ rotl(x1, r)
    x0 = x0 + ks[(step + 1) % 3]
    x1 = x1 + ks[(step + 2) % 3] + jnp.uint32(step + 1)
  return x0, x1


def _is_threefry(key: PRNGKey) -> bool:
  """Whether ``key`` is a typed key of jax's threefry2x32 generator (whose
  derivations :func:`_fold_in` and :func:`key_words` reproduce)."""
  return (
    jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    and str(jax.random.key_impl(key)) == "threefry2x32"
  )


def _fold_in(key: PRNGKey, data: jax.Array) -> PRNGKey:
  """``jax.random.fold_in(key, d)`` for each ``d`` in ``data`` (uint32): the
  hash of the counters ``(0, d)`` under ``key``."""
  words = jax.random.key_data(key)
  y0, y1 = _threefry2x32(
    words[..., 0], words[..., 1], jnp.zeros_like(data), data
  )
  return jax.random.wrap_key_data(
    jnp.stack([y0, y1], axis=-1), impl="threefry2x32"
  )


def key_words(keys: PRNGKey) -> jax.Array:
  """``jax.random.bits(k, (2,), uint32)`` of each key: ``(*keys.shape, 2)``.

  For threefry keys (with ``jax_threefry_partitionable``, the default) the
  two hashes of the counters ``(0, 0)`` and ``(0, 1)``, each word the xor of
  its pair; other generators go through ``jax.random``.
  """
  partitionable = getattr(jax.config, "jax_threefry_partitionable", False)
  if not (_is_threefry(keys) and partitionable):
    bits = lambda k: jax.random.bits(k, (2,), jnp.uint32)
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    for _ in range(keys.ndim if typed else keys.ndim - 1):  # raw: (..., 2)
      bits = jax.vmap(bits)
    return bits(keys)
  words = jax.random.key_data(keys)[..., None, :]  # (..., 1, 2)
  counter = jnp.arange(2, dtype=jnp.uint32)
  y0, y1 = _threefry2x32(
    words[..., 0], words[..., 1], jnp.zeros_like(counter), counter
  )
  return y0 ^ y1
