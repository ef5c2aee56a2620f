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
  return jax.random.fold_in(key, path_hash(path))


def path_hash(path: str) -> int:
  """The 31-bit hash of a path that :func:`path_key` folds into the key."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def group_keys(key: PRNGKey, num_groups: int) -> PRNGKey:
  """``num_groups`` keys, ``fold_in(key, g)`` for group ``g``."""
  return jax.vmap(jax.random.fold_in, (None, 0))(
    key, jnp.arange(num_groups, dtype=jnp.uint32)
  )
