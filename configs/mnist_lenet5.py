"""LeNet-5 on the full MNIST from the TFDS catalog (needs the data, or network
with --config.data.download=True)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "mnist_lenet5",
    data=dict(name="mnist"),
    model=dict(name="lenet5"),
    train=dict(epochs=10, batch_size=128, learning_rate=2e-3),
  )
