"""ResNet-20 on CIFAR-10 from the TFDS catalog (a GPU run: ~60 epochs)."""

from experiments import defaults


def get_config():
  return defaults.base(
    "cifar10_resnet20",
    data=dict(name="cifar10"),
    model=dict(name="resnet20", width=16),
    train=dict(
      optimizer="sgd",
      learning_rate=0.1,
      weight_decay=5e-4,
      epochs=60,
      batch_size=128,
      warmup_steps=400,
      flip=True,
      crop_pad=4,
    ),
  )
