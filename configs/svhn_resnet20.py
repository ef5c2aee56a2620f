"""ResNet-20 on SVHN (cropped digits) from the TFDS catalog (a GPU run)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "svhn_resnet20",
    data=dict(name="svhn_cropped"),
    model=dict(name="resnet20", width=16),
    train=dict(
      optimizer="sgd",
      learning_rate=0.05,
      weight_decay=5e-4,
      epochs=20,
      batch_size=128,
      warmup_steps=400,
      crop_pad=4,
    ),
  )
