"""Names of pytree leaves and the ``where`` selectors built on them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp

# ``where`` accepts a regex over the "/"-joined path, a predicate over the path
# tuple and the leaf, or None for the default rule.
Where = Union[None, str, re.Pattern, Callable[[tuple[str, ...], Any], bool]]


def key_name(entry: Any) -> str:
  """The plain name of one pytree path entry (dict key, attribute, index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as a tuple of names, without NNX's trailing ``value`` entry.

  ``nnx.State`` flattens each variable through its ``.value`` attribute; users
  think of ``("linear", "kernel")``, not ``("linear", "kernel", "value")``.
  """
  names = tuple(key_name(e) for e in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] in (
      "value",
      "raw_value",
  ):
    names = names[:-1]
  return names


def path_str(path: tuple[Any, ...]) -> str:
  return "/".join(path_names(path)) or "<root>"


def is_float_array(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


# Leaf names that stay in float by default whatever their rank (an Einsum's
# bias is 2-D; normalisation statistics can be too).
FLOAT_BY_DEFAULT = frozenset({"bias", "scale", "mean", "var"})


def default_where(names: tuple[str, ...], leaf: Any) -> bool:
  """Weight matrices, kernels and embeddings: float leaves with ``ndim >= 2``.

  Biases, normalisation scales and statistics (leaves named ``bias``,
  ``scale``, ``mean``, ``var``) and other vectors stay in float.
  """
  if names and names[-1] in FLOAT_BY_DEFAULT:
    return False
  return is_float_array(leaf) and leaf.ndim >= 2


def make_selector(where: Where) -> Callable[[tuple[str, ...], Any], bool]:
  """Turns a ``where`` argument into a predicate over ``(names, leaf)``."""
  if where is None:
    return default_where
  if isinstance(where, (str, re.Pattern)):
    pattern = re.compile(where)
    return lambda names, leaf: pattern.search("/".join(names)) is not None
  if callable(where):
    return where
  raise TypeError(
      "`where` must be None, a regex (str or re.Pattern) matched against the"
      " '/'-joined leaf path, or a callable (path_tuple, leaf) -> bool; got"
      f" {type(where).__name__}"
  )
