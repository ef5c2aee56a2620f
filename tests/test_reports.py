"""``_reports``: the per-layer report of a model call."""

import jax

from mcq_jax import ApplyReport, LayerReport


def _report():
  return ApplyReport(
    layers=(
      LayerReport("Dense_0", "Dense", "int", "sampled", True),
      LayerReport(
        "Dense_0#1",
        "Dense",
        "float",
        "sampled",
        False,
        "float weights: activations sampled, contraction in float",
      ),
      LayerReport(
        "Embed_0", "Embed", "int", "float", False, "layer type not covered"
      ),
    )
  )


def test_integer_layers_and_table():
  report = _report()
  assert report.integer_layers == ("Dense_0",)
  assert str(report).splitlines() == [
    "Dense_0: Dense, weights int, activations sampled -> integer",
    "Dense_0#1: Dense, weights float, activations sampled -> float"
    "  (float weights: activations sampled, contraction in float)",
    "Embed_0: Embed, weights int, activations float -> float"
    "  (layer type not covered)",
  ]


def test_is_a_leafless_pytree_that_jit_can_return():
  report = _report()
  assert jax.tree_util.tree_leaves(report) == []
  out = jax.jit(lambda x: (x + 1, report))(1.0)
  assert out[1] == report


def test_a_lifted_layer_says_it_stands_for_every_iteration():
  report = ApplyReport(
    layers=(
      LayerReport(
        "layers/Dense_0", "Dense", "int", "sampled", True, lifted=True
      ),
    )
  )
  assert str(report) == (
    "layers/Dense_0: Dense, weights int, activations sampled -> integer"
    "  [lifted transform: one entry for all its iterations]"
  )
