"""A small Transformer encoder (7x7 patches of 4x4 pixels) on MNIST 5k."""

from experiments import defaults


def get_config():
  return defaults.base(
    "mnist5k_transformer",
    data=dict(name="mnist5k", test_fraction=0.2),
    model=dict(
      name="transformer", patch=4, dim=64, depth=2, heads=4, mlp_dim=128
    ),
    train=dict(epochs=30, batch_size=128, learning_rate=1e-3, warmup_steps=100),
  )
