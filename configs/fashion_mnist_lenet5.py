"""LeNet-5 on Fashion-MNIST from the TFDS catalog (needs the data, or network
with --config.data.download=True)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "fashion_mnist_lenet5",
    data=dict(name="fashion_mnist"),
    model=dict(name="lenet5"),
    train=dict(epochs=15, batch_size=128, learning_rate=2e-3),
  )
