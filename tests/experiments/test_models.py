"""Every experiment model runs in float and through mcq_apply in integers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import mcq_jax
from experiments import models

# Small instances of each architecture: the block types and stems of the full
# ResNets with one block per stage (the full depths are built in test_configs).
SMALL = {
  "mlp": lambda: models.MLP(hidden=(16,)),
  "lenet5": lambda: models.LeNet5(),
  "vgg": lambda: models.VGG(stages=(4, 8), dense=8),
  "resnet20": lambda: models.ResNet((1, 1), "basic", 4, "cifar", 10),
  "resnet18": lambda: models.ResNet((1, 1), "basic", 4, "imagenet", 10),
  "resnet50": lambda: models.ResNet((1, 1), "bottleneck", 4, "imagenet", 10),
  "transformer": lambda: models.Transformer(
    patch=4, dim=16, depth=1, heads=2, mlp_dim=16
  ),
}


# The image classifiers (decoder_lm: tests/experiments/test_language_model.py).
IMAGE_MODELS = tuple(m for m in models.MODELS if m != "decoder_lm")


def test_every_image_model_has_a_small_instance():
  assert set(SMALL) == set(IMAGE_MODELS)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_model_runs_quantized_in_integers(name):
  model = SMALL[name]()
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), x)
  if "batch_stats" in variables:  # one training step fills the statistics
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  expected = model.apply(variables, x)
  assert expected.shape == (2, 10)
  params_q = mcq_jax.quantize(
    variables["params"], jax.random.key(2), samples_per_weight=256.0
  )
  q_vars = {**variables, "params": params_q}
  out, report = mcq_jax.mcq_apply(
    model,
    q_vars,
    x,
    key=jax.random.key(3),
    activation_samples=256.0,
    return_report=True,
  )
  # every parameterised layer ran in integer arithmetic
  kernels = [
    p
    for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    if jax.tree_util.keystr(p).endswith("'kernel']")
  ]
  assert len(report.integer_layers) == len(kernels)
  # what else holds quantized params (the Transformer's position embedding,
  # added rather than contracted) runs in float on dequantized values, reported
  others = [r for r in report.layers if not r.integer]
  assert [(r.path, r.layer) for r in others] == (
    [("<root>", "Transformer")] if name == "transformer" else []
  )
  # and with many samples the integer model tracks the float one
  scale = float(jnp.abs(expected).max())
  assert float(jnp.abs(out - expected).max()) < 0.2 * scale
  assert np.isfinite(np.asarray(out)).all()


def test_unknown_model_is_rejected():
  with pytest.raises(ValueError, match="unknown model 'alexnet'"):
    models.build(ConfigDict({"name": "alexnet"}), 10)
