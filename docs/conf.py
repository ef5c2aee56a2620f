"""Sphinx configuration of the mcq_jax documentation site.

Build it from the repository root, offline, with warnings as errors::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

and open ``docs/_build/html/index.html``. The build is nitpicky (``nitpicky =
True`` below: every cross-reference must resolve), never executes the notebooks
(the test suite does) and fetches nothing from the network (no intersphinx).
The API reference is generated from ``mcq_jax.__all__`` at build time (see
``API_GROUPS``), so a public name is documented as soon as it is exported.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys

# Document the code of this checkout, also when another copy is installed.
DOCS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS_DIR))

import mcq_jax  # noqa: E402  (after the path is set)

# -- Project -----------------------------------------------------------------

project = "mcq_jax"
author = "the mcq_jax authors"
copyright = "the mcq_jax authors"  # noqa: A001  (Sphinx's name)
release = mcq_jax.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------

extensions = [
  "myst_nb",  # Markdown (MyST) pages and notebooks; registers .md and .ipynb
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  # No sphinx.ext.intersphinx: the build runs offline and fetches nothing.
]

# The notebooks live in <repo>/notebooks, outside this folder, where the test
# suite executes them and Colab opens them. They are rendered in place through
# the relative symlink docs/notebooks -> ../notebooks (committed in git):
# Sphinx follows symlinked folders when it collects sources, nothing is copied
# or duplicated, and an edited notebook is picked up by the next build.
exclude_patterns = [
  "_build",
  "Thumbs.db",
  ".DS_Store",
  "**/.ipynb_checkpoints",
  "**/__pycache__",
]

root_doc = "index"
default_role = "py:obj"  # `name` in docstrings is a cross-reference
nitpicky = True
pygments_style = "default"

# Types of other libraries (in type hints) cannot be linked without
# intersphinx, which would need the network; they are shown as plain names.
# Everything of mcq_jax itself must resolve.
nitpick_ignore_regex = [
  (r"py:class", r"(jax|jaxlib|flax|numpy|optax)\..*"),
  (r"py:class", r"(re|os|collections\.abc|types)\..*"),
]

# -- MyST and notebooks --------------------------------------------------------

myst_enable_extensions = [
  "amsmath",  # \begin{align} ... environments
  "dollarmath",  # $inline$ and $$display$$ math
  "colon_fence",
  "deflist",
]
myst_heading_anchors = 3

nb_execution_mode = "off"  # the test suite executes the notebooks
nb_merge_streams = True

# -- autodoc / autosummary / napoleon ------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "description"  # types go into the Args list
autodoc_typehints_description_target = "documented_params"
autodoc_inherit_docstrings = False  # Flax's AxisMetadata docs are not ours
autosummary_generate = False  # tables only: the entries live on the API page

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not duplicate objects
napoleon_use_rtype = False
napoleon_custom_sections = [("References", "notes_style")]

# -- HTML ----------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"mcq_jax {release}"
html_theme_options = {
  "show_toc_level": 2,
  "home_page_in_toc": True,
  "use_fullscreen_button": False,
}
html_show_sourcelink = True

# -- The API reference, generated from mcq_jax.__all__ -------------------------

# (title, introduction, names). Names that are no longer exported are skipped;
# exported names that no group lists go to a final "Other names" section, so
# every name in mcq_jax.__all__ is documented exactly once whatever changes.
API_GROUPS = (
  (
    "Quantizing pytrees",
    "MCQ of the weights of any pytree, and the inverse map back to floats.",
    ("quantize", "dequantize", "num_samples", "SAMPLERS", "GRANULARITIES"),
  ),
  (
    "The quantized array type",
    "Every quantized leaf, whatever produced it, is a `QArray`.",
    ("QArray",),
  ),
  (
    "Baselines",
    "Uniform-grid quantizers that return the same leaf type, for comparisons.",
    ("round_to_nearest", "stochastic_rounding"),
  ),
  (
    "Integer inference",
    "Run linen or NNX models with sampled activations and integer layers.",
    (
      "mcq_apply",
      "mcq_call",
      "ApplyReport",
      "LayerReport",
      "COVERED_LAYERS",
      "NNX_COVERED_LAYERS",
    ),
  ),
  (
    "Activations",
    "MCQ of an activation tensor, one distribution per example or token.",
    ("quantize_activations",),
  ),
  (
    "Reports",
    "What a quantized pytree costs: bits, entropy, zeros and bytes.",
    ("summary", "Summary", "LeafSummary", "bit_width", "entropy_bits"),
  ),
  (
    "Errors under jit",
    "Value-dependent errors (non-finite weights or activations, int32"
    " overflow) keep their documented type when found inside a compiled"
    " program.",
    ("checked",),
  ),
  (
    "Checkpoints",
    "Quantized trees on disk (safetensors or orbax), and checkpoints quantized"
    " one tensor at a time; the `mcq-jax quantize` command runs"
    " `quantize_checkpoint`.",
    ("save", "load", "quantize_checkpoint", "CheckpointFormatError"),
  ),
  (
    "Low-level sampling",
    "The Monte Carlo core: hit counts of one group of values.",
    ("sample_counts",),
  ),
  (
    "Native kernels",
    "On the CPU the bounded samplers run as native kernels, built once per"
    " machine; the XLA program, which gives the same integers, runs"
    " elsewhere and where they cannot be built.",
    ("native_status", "NativeStatus", "NativeBuildError"),
  ),
)

API_MARKER = "<!-- api-sections: generated by conf.py -->"


def _public_name(cls: type) -> str:
  """The shortest public dotted name of a class (``flax.linen.Dense``)."""
  parts = cls.__module__.split(".")
  for i in range(1, len(parts) + 1):
    module = sys.modules.get(".".join(parts[:i]))
    if getattr(module, cls.__qualname__, None) is cls:
      return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
  return f"{cls.__module__}.{cls.__qualname__}"


# Module constants carry no docstring (autodoc and autosummary would show the
# docstring of their type, tuple or dict); these texts document them instead.
# reStructuredText: they are inserted as docstrings.
CONSTANT_DOCS = {
  "SAMPLERS": "The sampler names accepted by ``sampler=``.",
  "GRANULARITIES": "The granularities accepted by ``granularity=``.",
  "COVERED_LAYERS": (
    "The linen layer classes that :func:`mcq_jax.mcq_apply` computes"
    " itself (sampled activations, integer contraction); other layers run"
    " as the model defines them."
  ),
  "NNX_COVERED_LAYERS": (
    "The NNX layer classes that :func:`mcq_jax.mcq_call` computes itself,"
    " each with the attribute through which its contraction is replaced."
  ),
}


def _shows_value(value) -> bool:
  return isinstance(value, tuple) and all(isinstance(v, str) for v in value)


def _constant_doc(name: str, value) -> list[str]:
  """Docstring lines of an exported constant: its purpose and its value."""
  purpose = CONSTANT_DOCS.get(
    name, f"A constant of type ``{type(value).__name__}``."
  )
  if _shows_value(value):
    return [purpose]  # the signature line shows the value
  name_of = lambda v: _public_name(v) if isinstance(v, type) else repr(v)
  if isinstance(value, dict):
    items = [f"``{name_of(k)}`` (through ``{v}``)" for k, v in value.items()]
  else:
    items = [f"``{name_of(v)}``" for v in value]
  return [purpose, "", "Value: " + ", ".join(items) + "."]


def _document_constants(app, what, name, obj, options, lines):
  """autodoc-process-docstring: constants get their text, not their type's."""
  public = name.removeprefix("mcq_jax.")
  if (
    what in ("data", "attribute")
    and public in mcq_jax.__all__
    and not (inspect.isclass(obj) or callable(obj))
  ):
    lines[:] = _constant_doc(public, obj)


# How some types stringify in the attribute types napoleon writes (their
# private home module) and the names readers know them by.
TYPE_DISPLAY = {"jax.jaxlib._jax.Array": "jax.Array"}
_PRIVATE_MCQ_NAME = re.compile(r"\bmcq_jax\._\w+\.(\w+)")


def _public_type_names(app, what, name, obj, options, lines):
  """autodoc-process-docstring (after napoleon): public names in types."""
  for i, line in enumerate(lines):
    for private, public in TYPE_DISPLAY.items():
      line = line.replace(private, public)
    lines[i] = _PRIVATE_MCQ_NAME.sub(
      lambda m: f"mcq_jax.{m[1]}" if m[1] in mcq_jax.__all__ else m[0], line
    )


def _api_entry(name: str) -> str:
  obj = getattr(mcq_jax, name)
  if inspect.isclass(obj):
    return (
      f"```{{eval-rst}}\n.. autoclass:: {name}\n   :members:\n"
      f"   :exclude-members: replace\n```\n"
    )
  if callable(obj):
    return f"```{{eval-rst}}\n.. autofunction:: {name}\n```\n"
  value = "" if _shows_value(obj) else "   :no-value:\n"
  return f"```{{eval-rst}}\n.. autodata:: {name}\n{value}```\n"


def api_sections() -> str:
  """MyST source of the API sections: a summary table, then every entry."""
  exported = list(mcq_jax.__all__)
  groups = [
    (title, intro, [n for n in names if n in exported])
    for title, intro, names in API_GROUPS
  ]
  listed = {n for _, _, names in groups for n in names}
  other = [n for n in exported if n not in listed]
  if other:
    groups.append(("Other names", "Further public names.", other))
  out = []
  for title, intro, names in groups:
    if not names:
      continue
    table = "\n".join(f"   {n}" for n in names)
    out.append(f"## {title}\n\n{intro}\n")
    out.append(
      f"```{{eval-rst}}\n.. autosummary::\n   :nosignatures:\n\n{table}\n```\n"
    )
    out.extend(_api_entry(n) for n in names)
  return "\n".join(out)


def _insert_api_sections(app, docname, source):
  if docname == "api" and API_MARKER in source[0]:
    source[0] = source[0].replace(API_MARKER, api_sections())


def _always_reread_api(app, env, added, changed, removed):
  # The API page depends on mcq_jax.__all__, which Sphinx does not track.
  return ["api"] if "api" in env.found_docs else []


def _resolve_private_module_refs(app, env, node, contnode):
  """Links ``mcq_jax._private.Name`` (how type hints spell the public classes,
  whose ``__module__`` is private) to the documented ``mcq_jax.Name``."""
  target = node.get("reftarget", "")
  if node.get("refdomain") != "py" or not target.startswith("mcq_jax._"):
    return None
  public = target.rsplit(".", 1)[-1]
  if public not in mcq_jax.__all__:
    return None
  domain = env.get_domain("py")
  return domain.resolve_xref(
    env,
    node["refdoc"],
    app.builder,
    node["reftype"],
    f"mcq_jax.{public}",
    node,
    contnode,
  )


def _ipython_lexer_for_notebooks(app, docname, source):
  """Highlights notebook cells as IPython, not plain Python.

  The notebooks name their language ``python`` without the ``pygments_lexer``
  that Jupyter usually records, and their Colab set-up cells hold IPython
  syntax (``%pip``, ``!git``) that the Python lexer rejects with a warning.
  The notebook files are left as they are; only the text Sphinx parses gains
  ``language_info.pygments_lexer = "ipython3"`` where it is missing.
  """
  if not str(app.env.doc2path(docname)).endswith(".ipynb"):
    return
  notebook = json.loads(source[0])
  info = notebook.setdefault("metadata", {}).setdefault("language_info", {})
  if "pygments_lexer" not in info:
    info["pygments_lexer"] = "ipython3"
    source[0] = json.dumps(notebook, ensure_ascii=False, indent=1)


def setup(app):
  app.connect("source-read", _insert_api_sections)
  app.connect("source-read", _ipython_lexer_for_notebooks)
  app.connect("autodoc-process-docstring", _document_constants)
  app.connect("autodoc-process-docstring", _public_type_names, priority=900)
  app.connect("env-get-outdated", _always_reread_api)
  app.connect("missing-reference", _resolve_private_module_refs)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
