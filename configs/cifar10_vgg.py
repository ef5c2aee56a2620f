"""VGG-style net on CIFAR-10 from the TFDS catalog (a GPU run: ~40 epochs)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "cifar10_vgg",
    data=dict(name="cifar10"),
    model=dict(name="vgg", stages=[64, 128, 256], dense=256),
    train=dict(
      optimizer="sgd",
      learning_rate=0.05,
      weight_decay=5e-4,
      epochs=40,
      batch_size=128,
      warmup_steps=400,
      flip=True,
      crop_pad=4,
    ),
  )
