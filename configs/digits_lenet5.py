"""LeNet-5 on scikit-learn's real 8x8 digits (embedded, offline)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "digits_lenet5",
    data=dict(name="digits", test_fraction=0.25),
    model=dict(name="lenet5"),
    train=dict(epochs=40, batch_size=128, learning_rate=3e-3),
  )
