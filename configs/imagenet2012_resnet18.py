"""ResNet-18 on ImageNet through TFDS (manual download; see
``experiments.defaults.imagenet``)."""

from experiments import defaults


def get_config():
  return defaults.imagenet(
    "imagenet2012_resnet18", model=dict(name="resnet18", width=64)
  )
