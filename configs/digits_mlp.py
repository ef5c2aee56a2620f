"""Default run: MLP 64-128-128-10 on scikit-learn's real 8x8 digits, offline."""

from experiments import defaults


def get_config():
  return defaults.base(
    "digits_mlp",
    data=dict(name="digits", test_fraction=0.25),
    model=dict(name="mlp", hidden=[128, 128]),
    train=dict(epochs=40, batch_size=128, learning_rate=3e-3),
  )
