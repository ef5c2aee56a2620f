"""Names of pytree leaves and the ``where`` selectors built on them."""

from __future__ import annotations

import concurrent.futures
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from mcq_jax import _keys
from mcq_jax._qarray import is_qarray
from mcq_jax._typing import PyTree, Where

# A ``where`` turned into a predicate over (path names, leaf or module).
Selector = Callable[[tuple[str, ...], Any], bool]


def key_name(entry: object) -> str:
  """The plain name of one pytree path entry (dict key, attribute, index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as a tuple of names (dict keys, attributes, indices)."""
  return tuple(key_name(e) for e in path)


def is_variable(x: object) -> bool:
  """Whether ``x`` is an NNX ``Variable`` (``nnx.Param``, ``nnx.BatchStat``...).

  An ``nnx.State`` flattens each variable through its ``.value`` attribute;
  users think of ``("linear", "kernel")``, not ``("linear", "kernel",
  "value")``. Traversals stop at variables and name their value by the
  variable's path, so that only NNX's own box loses its ``value`` entry (a
  struct field named ``value`` keeps its name).
  """
  from flax import nnx

  return isinstance(x, nnx.Variable)


def is_leaf_or_variable(x: object) -> bool:
  """The ``is_leaf`` of name-aware traversals: QArrays and NNX variables."""
  return is_qarray(x) or is_variable(x)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``("/"-joined path, leaf)`` of every leaf, a variable's value named by
  the variable's path; ``QArray`` s are leaves."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=is_leaf_or_variable
  )[0]:
    name = "/".join(path_names(path)) or "<root>"
    if is_variable(leaf):
      out += [
        (name, inner)
        for inner in jax.tree_util.tree_leaves(leaf, is_leaf=is_qarray)
      ]
    else:
      out.append((name, leaf))
  return out


def path_str(path: tuple[Any, ...]) -> str:
  """A key path as one "/"-joined string (``"<root>"`` for the root)."""
  return "/".join(path_names(path)) or "<root>"


def is_float_array(leaf: object) -> bool:
  """Whether ``leaf`` is an array (or array-like) of a floating dtype."""
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


def select_all(names: tuple[str, ...], item: Any) -> bool:
  """The default of ``mcq_apply`` / ``mcq_call``: every covered layer."""
  del names, item
  return True


def make_selector(
  where: Where,
  default: Selector = default_where,
  what: str = "leaf",
) -> Selector:
  """Turns a ``where`` argument into a predicate over ``(names, item)``.

  ``what`` names the item in the error message ("leaf", "module").
  """
  if where is None:
    return default
  if isinstance(where, (str, re.Pattern)):
    pattern = re.compile(where)
    return lambda names, item: pattern.search("/".join(names)) is not None
  if callable(where):
    return where
  raise TypeError(
    "`where` must be None, a regex (str or re.Pattern) matched against the"
    f" '/'-joined {what} path, or a callable (path_tuple, {what}) -> bool;"
    f" got {type(where).__name__}"
  )


class DistinctKeys:
  """Refuses a second leaf whose key would coincide with an earlier one's.

  Each leaf's random key comes from its ``/``-joined path: two leaves that
  join alike, or whose path hashes collide, would get identical draws.
  """

  def __init__(self) -> None:
    self._seen: dict[int, tuple[str, tuple[str, ...]]] = {}

  def add(self, name: str, names: tuple[str, ...]) -> None:
    """Records the leaf ``name`` (path ``names``).

    Raises:
      ValueError: if an earlier leaf's key coincides, naming both.
    """
    digest = _keys.path_hash(name)
    if digest in self._seen:
      other, other_names = self._seen[digest]
      why = (
        f"have the same path {name!r}"
        if other == name
        else f"have paths {other!r} and {name!r} whose keys coincide (their"
        " hashes collide)"
      )
      raise ValueError(
        f"leaves {other_names} and {names} {why}, so their random draws would"
        " be identical: rename a key so that the '/'-joined paths differ"
      )
    self._seen[digest] = (name, names)


def map_selected(
  fn: Callable[[jax.Array, str], Any],
  tree: PyTree,
  where: Where,
  *,
  inputs: tuple[Any, ...] | None = None,
) -> PyTree:
  """Replaces each selected float leaf by ``fn(leaf, path_string)``.

  Leaves already quantized and leaves that are not floating point are kept as
  they are (not copied), whatever ``where`` says. ``inputs``, if given, are
  all the other arrays ``fn`` reads (a key): with no tracer among them or
  the leaves, and no trace under way, the leaves are processed on a few
  threads.

  Raises:
    ValueError: if an explicit ``where`` selects no float or quantized leaf
      (a selection of already quantized leaves only is a valid no-op), or if
      two selected leaves have the same ``/``-joined path (or
      paths whose key hashes coincide): each leaf's random key comes from its
      path, so they would get identical draws.
  """
  selected = make_selector(where)
  check_distinct = DistinctKeys()
  candidates: list[str] = []
  matched = False
  jobs: list[tuple[jax.Array, str]] = []
  runs: list[bool] = []  # per float/quantized leaf visited: a job or not
  results: Iterator[Any] = iter(())
  decisions: Iterator[bool] = iter(())

  def process(names: tuple[str, ...], leaf: Any) -> Any:
    nonlocal matched
    if not (is_qarray(leaf) or is_float_array(leaf)):
      return leaf
    name = "/".join(names) or "<root>"
    if results_ready:  # second pass: the job's result, in the same order
      return next(results) if next(decisions) else leaf
    candidates.append(name)
    runs.append(False)
    if not selected(names, leaf):
      return leaf
    matched = True
    if is_qarray(leaf):  # already quantized: kept, so that calls compose
      return leaf
    check_distinct.add(name, names)
    jobs.append((jnp.asarray(leaf), name))
    runs[-1] = True
    return leaf

  def visit(path: tuple[Any, ...], leaf: Any) -> Any:
    names = path_names(path)
    if is_variable(leaf):  # its value is named by the variable's path
      return jax.tree_util.tree_map(
        lambda inner: process(names, inner), leaf, is_leaf=is_qarray
      )
    return process(names, leaf)

  # First pass: validate and collect the selected leaves; then run ``fn`` on
  # them; second pass: put the results in place.
  results_ready = False
  jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_leaf_or_variable)
  if where is not None and not matched:
    # As mcq_apply does for layers: an explicit selection that selects
    # nothing is almost always a typo, and would silently change nothing.
    shown = ", ".join(repr(c) for c in candidates[:8])
    more = f", ... ({len(candidates)} in all)" if len(candidates) > 8 else ""
    raise ValueError(
      f"`where`={where!r} selects none of the float or quantized leaves:"
      f" {shown or 'there are none'}{more}"
    )
  results = iter(_run_all(fn, jobs, inputs))
  decisions = iter(runs)
  results_ready = True
  return jax.tree_util.tree_map_with_path(
    visit, tree, is_leaf=is_leaf_or_variable
  )


def _run_all(
  fn: Callable[[jax.Array, str], Any],
  jobs: list[tuple[jax.Array, str]],
  inputs: tuple[Any, ...] | None,
) -> list[Any]:
  """``fn`` on every job, in order. Concrete leaves run on a few threads:
  a cold call spends most of its time compiling XLA programs (one per leaf
  shape or bucket), which JAX does outside the GIL, so compiling several at
  once uses the cores that a single compilation leaves idle. The results, and
  the first error in leaf order, are those of a sequential run."""
  # Tracing is per thread: any trace under way (jit: even a fresh constant
  # is a tracer; vmap over keys: the key is) keeps everything on this one.
  concrete = inputs is not None and not any(
    isinstance(a, jax.core.Tracer)
    for a in (*(leaf for leaf, _ in jobs), *(inputs or ()), jnp.zeros(()))
  )
  workers = min(len(jobs), os.cpu_count() or 1, 8)
  if not concrete or workers < 2:
    return [fn(leaf, name) for leaf, name in jobs]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {i: pool.submit(fn, *jobs[i]) for i in _new_shapes_first(jobs)}
    return [futures[i].result() for i in range(len(jobs))]


def _new_shapes_first(jobs: list[tuple[jax.Array, str]]) -> list[int]:
  """The order to start the jobs in: the first leaf of each shape and dtype,
  then the others, each in leaf order.

  The first leaf of a shape is the one that compiles its programs, and
  started together those compilations keep every core busy; in leaf order, a
  model's last new shape would start compiling only once the repeats of the
  earlier shapes had run.
  """
  seen: set[tuple[Any, Any]] = set()
  new: list[int] = []
  repeats: list[int] = []
  for i, (leaf, _) in enumerate(jobs):
    signature = (getattr(leaf, "shape", None), getattr(leaf, "dtype", None))
    (repeats if signature in seen else new).append(i)
    seen.add(signature)
  return new + repeats
